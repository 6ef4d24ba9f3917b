"""A save or a checkpoint whose client leaves: nothing is published, a paused VM resumes
(the VM's side, with a fake qemu monitor behind a real control endpoint)."""

import os
import threading
import time
from types import SimpleNamespace

import pytest

from pcocc.agent import pki
from pcocc.agent.endpoint import ControlClient, ControlServer
from pcocc.errors import TimeoutExpired
from pcocc.lifecycle import saving
from pcocc.lifecycle.control import ControlHandler

OWNER = "alice"


class FakeMonitor:
    """qemu's QMP as far as pause/resume and a backup job go; a backup never ends unless cancelled."""

    def __init__(self):
        self.status = "running"
        self.jobs = {}
        self.log = []
        self.lock = threading.Lock()

    def cmd(self, name, **args):
        with self.lock:
            self.log.append(name)
            if name == "stop":
                self.status = "paused"
            elif name == "cont":
                self.status = "running"
            elif name == "query-status":
                return {"status": self.status}
            elif name == "drive-backup":
                self.jobs[args["job-id"]] = {"id": args["job-id"], "status": "running"}
            elif name == "query-jobs":
                return list(self.jobs.values())
            elif name == "job-cancel":
                self.jobs[args["id"]]["status"] = "concluded"
                self.jobs[args["id"]]["error"] = "cancelled"
            elif name == "job-dismiss":
                self.jobs.pop(args["id"], None)
            return {}


class FakeAgent:
    def fsfreeze(self, timeout=None):
        return 1

    def fsthaw(self, timeout=None):
        return 1


class FakeImages:
    """save_layer as the repository does it: fill a tmp file, publish only if fill returned."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.published = []

    def save_layer(self, rev, fill, dest=None, full=False, description=None, before_commit=None):
        path = os.path.join(self.tmp, "layer.tmp")
        try:
            fill(path, None if full else "../blobs/base")
            if before_commit is not None:
                before_commit()
            self.published.append(dest)
            return SimpleNamespace(uri="r:x@1", repo=SimpleNamespace(name="r"), name="x", revision=1, layers=("a", "b"))
        finally:
            if os.path.exists(path):
                os.unlink(path)


def fake_vm(monitor):
    stopped = []
    vm = SimpleNamespace(monitor=monitor, proc=None,
                         config=SimpleNamespace(name="vm0", disk=True, topology=SimpleNamespace(vcpus=1, emulator_cores=[], memory_mb=64)),
                         stop=lambda graceful=False: stopped.append(graceful))
    return vm, stopped


@pytest.fixture
def endpoint(tmp_path, monkeypatch):
    from pcocc.images import qcow2, qemuimg

    monkeypatch.setattr(qcow2, "create_overlay", lambda path, backing, size: open(path, "wb").close())
    monkeypatch.setattr(qemuimg, "create", lambda path, size, fmt="qcow2": open(path, "wb").close())
    ca = pki.make_ca("c")
    cert, key = pki.issue(*ca, "vm0", server=True, ips=("127.0.0.1",))
    monitor = FakeMonitor()
    vm, stopped = fake_vm(monitor)
    images = FakeImages(str(tmp_path))
    handler = ControlHandler(vm, FakeAgent(), rev=SimpleNamespace(size=2**20, uri="r:x@0"), images=lambda: images)
    server = ControlServer(handler, ca_pem=ca[0], cert_pem=cert, key_pem=key, owner=OWNER).start()
    ucert, ukey = pki.issue(*ca, OWNER)

    def client(timeout=5.0):
        return ControlClient(server.address, ca_pem=ca[0], cert_pem=ucert, key_pem=ukey, timeout=timeout)

    yield SimpleNamespace(monitor=monitor, images=images, client=client, stopped=stopped, handler=handler, tmp=tmp_path, server=server)
    server.stop()


def wait_until(pred, what, limit=1000):
    for _ in range(limit):
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_a_save_whose_client_leaves_is_cancelled_and_publishes_nothing(endpoint):
    with endpoint.client(timeout=0.3) as c:
        with pytest.raises(TimeoutExpired):
            c.call("save", dest="interrupted", full=True)  # the copy never ends; the client gives up and leaves
    wait_until(lambda: "job-cancel" in endpoint.monitor.log, "the backup job cancelled")
    wait_until(lambda: endpoint.handler._disk_lock.acquire(blocking=False), "the save over")
    endpoint.handler._disk_lock.release()
    assert endpoint.images.published == []
    assert os.listdir(endpoint.tmp) == []  # its layer is gone too
    assert "cont" not in endpoint.monitor.log and endpoint.monitor.status == "running"  # the VM never stopped


def test_save_disk_checks_its_client_before_handing_the_layer_over(tmp_path, monkeypatch):
    from pcocc.hypervisor import snapshot

    monkeypatch.setattr(snapshot, "backup", lambda *a, on_started=None, **k: on_started and on_started())
    monkeypatch.setattr(snapshot, "fsync_file", lambda path: None)
    from pcocc.images import qcow2

    monkeypatch.setattr(qcow2, "create_overlay", lambda path, backing, size: open(path, "wb").close())
    vm, _ = fake_vm(FakeMonitor())
    images = FakeImages(str(tmp_path))
    present = iter([True, False])  # there at the start, gone once the copy is done
    with pytest.raises(saving.SaveAbandoned, match="nothing was published"):
        saving.save_disk(vm, FakeAgent(), SimpleNamespace(size=1, uri="r:x@0"), images, client_present=lambda: next(present))
    assert images.published == []
    report = saving.save_disk(vm, FakeAgent(), SimpleNamespace(size=1, uri="r:x@0"), images, client_present=lambda: True)
    assert report["uri"] == "r:x@1" and images.published == [None]


def ckpt_stream(endpoint):
    """A client and its checkpoint stream (lifecycle.control.op_ckpt), the VM paused."""
    c = endpoint.client()
    stream = c.open("ckpt")
    assert stream.receive(5.0) == ("event", {"paused": True})
    assert endpoint.monitor.status == "paused"
    return c, stream


def final(stream):
    """The stream's result (events before it skipped)."""
    while True:
        kind, value = stream.receive(5.0)
        assert kind is not None, "no answer within 5 s"
        if kind == "result":
            return value


def test_a_checkpoint_pause_is_undone_when_its_client_leaves(endpoint):
    c, _ = ckpt_stream(endpoint)
    c.close()  # the CLI killed between pause and quit
    wait_until(lambda: endpoint.monitor.status == "running", "the VM resumed")
    assert endpoint.stopped == []


def test_a_checkpoint_whose_client_leaves_during_the_save_gives_up_and_resumes(endpoint, tmp_path):
    endpoint.handler.rev = SimpleNamespace(size=2**20, uri="r:x@0", layers=(), top=str(tmp_path / "top"))
    c, stream = ckpt_stream(endpoint)
    stream.send({"save": str(tmp_path)})
    wait_until(lambda: "drive-backup" in endpoint.monitor.log, "the disk's copy started")
    c.close()  # the copy never ends by itself
    wait_until(lambda: "job-cancel" in endpoint.monitor.log, "the copy cancelled")
    wait_until(lambda: endpoint.monitor.status == "running", "the VM resumed")
    assert endpoint.stopped == []


def test_a_checkpoint_that_quit_does_not_resume(endpoint):
    c, stream = ckpt_stream(endpoint)
    stream.send({"quit": True})
    assert final(stream) == {"drives": []}
    c.close()
    wait_until(lambda: not endpoint.server._conns, "the connection's end handled")
    assert endpoint.stopped == [False] and "cont" not in endpoint.monitor.log


def test_an_explicit_resume_is_not_repeated_at_close(endpoint):
    c, stream = ckpt_stream(endpoint)
    stream.send({"resume": True})
    assert final(stream) == {"resumed": True}
    assert endpoint.monitor.status == "running"
    assert endpoint.monitor.log.count("query-status") == 1  # resumed once (checkpoint.resume asks first)
    c.close()
    wait_until(lambda: not endpoint.server._conns, "the connection's end handled")
    assert endpoint.monitor.log.count("query-status") == 1  # nothing undone at the end


def test_a_resume_sent_during_a_save_gives_the_save_up(endpoint, tmp_path):
    """Another VM failed: the CLI tells every VM to resume at once, also those still saving."""
    endpoint.handler.rev = SimpleNamespace(size=2**20, uri="r:x@0", layers=(), top=str(tmp_path / "top"))
    c, stream = ckpt_stream(endpoint)
    stream.send({"save": str(tmp_path)})
    wait_until(lambda: "drive-backup" in endpoint.monitor.log, "the disk's copy started")
    stream.send({"resume": True})  # the copy never ends by itself
    assert final(stream) == {"resumed": True}
    assert "job-cancel" in endpoint.monitor.log and endpoint.monitor.status == "running"
    assert endpoint.stopped == []
    c.close()


def test_a_bad_checkpoint_message_resumes_and_says_why(endpoint):
    from pcocc.errors import UsageError

    c, stream = ckpt_stream(endpoint)
    stream.send({"jump": True})
    with pytest.raises(UsageError, match="bad checkpoint message"):
        final(stream)
    assert endpoint.monitor.status == "running"
    c.close()


def test_a_memory_save_that_fills_the_disk_says_so(tmp_path, monkeypatch):
    """Review: qemu says only "Unable to write to command: Broken pipe" when its compressor
    finds the disk full; the error names the full file system (statvfs: f_bavail)."""
    from pcocc.hypervisor import snapshot

    class Failing(FakeMonitor):
        def cmd(self, name, **args):
            if name == "query-migrate":
                return {"status": "failed", "error-desc": "Unable to write to command: Broken pipe"}
            return super().cmd(name, **args)

    space = {"free": 0}
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=space["free"], f_frsize=4096))
    with pytest.raises(snapshot.SnapshotError, match=f"Broken pipe \\(no space left on the file system of {tmp_path}\\)"):
        snapshot.save_memory(Failing(), str(tmp_path / "memory-vm0.zst"), "zstd")
    space["free"] = 1 << 20  # 4 GiB free: qemu's own words only
    with pytest.raises(snapshot.SnapshotError, match="Broken pipe$"):
        snapshot.save_memory(Failing(), str(tmp_path / "memory-vm0.zst"), "zstd")
