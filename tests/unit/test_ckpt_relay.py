"""pcocc ckpt through the host relays (issue 15): the CLI's side (cli.saving.take_checkpoint)
against the real VM side (lifecycle.control.op_ckpt) behind real ControlServers, 2 hosts x 2
VMs chained by relays of width 1, each VM's qemu a fake monitor (test_save_ckpt_abandoned's).

What must hold: one TLS connection from the CLI whatever the VM count; every VM paused
before any writes, none stopped before the checkpoint is published; any failure, or the
CLI gone, and every VM runs again."""

import os
import threading
from types import SimpleNamespace

import pytest
from test_relay import creds, serve_vms, tls_client  # noqa: F401 - creds is a fixture
from test_save_ckpt_abandoned import FakeAgent, FakeMonitor, fake_vm, wait_until

from pcocc.agent import relay
from pcocc.cli import saving
from pcocc.errors import PcoccError
from pcocc.lifecycle import checkpoint
from pcocc.lifecycle.control import ControlHandler


@pytest.fixture
def cluster(creds, tmp_path, monkeypatch):  # noqa: F811 - the fixture imported above
    monkeypatch.setattr(relay, "WIDTH", 1)  # a chain: the CLI -> vm0 (h0) -> vm2 (h1) -> unix sockets
    monitors, stopped, drains = [], [], []
    events = []  # (what, vm name) in the order they happened
    lock = threading.Lock()

    def handler(rank, client_creds):
        monitors.append(FakeMonitor())
        vm, stop = fake_vm(monitors[-1])
        vm.config.name = f"vm{rank}"
        stopped.append(stop)
        h = ControlHandler(vm, FakeAgent(), rev=SimpleNamespace(size=1, uri="r:x@0"), relay_credentials=lambda: client_creds)
        # as lifecycle.vmrun once qemu is gone: the endpoint's stop then lets requests answer for drain_time()
        vm.stop = lambda graceful=False: (stop.append(graceful), drains.append((vm.config.name, h.drain_time())))
        return h

    servers, vms = serve_vms(creds, tmp_path, handler)
    connections = []

    def connect(address, timeout):
        connections.append(address)
        return tls_client(creds, address, timeout)

    def save_vm(vm, rev, drives, directory, cancelled=None):
        with lock:
            events.append(("save", vm.config.name))
        hooks.get(vm.config.name, lambda: None)()
        if vm.config.name in failing:
            raise checkpoint.CheckpointError(f"{vm.config.name}: no space left on device")
        with open(os.path.join(directory, f"memory-{vm.config.name}"), "w") as f:
            f.write("state")
        return {"name": vm.config.name, "drives": []}

    def recorded(what, fn):
        def run(*args, **kwargs):
            with lock:
                events.append((what, args[0].config.name if args else None))
            return fn(*args, **kwargs)
        return run

    failing = set()
    hooks = {}  # VM name: called as its save starts
    monkeypatch.setattr(checkpoint, "save_vm", save_vm)
    monkeypatch.setattr(checkpoint, "pause", recorded("pause", checkpoint.pause))
    monkeypatch.setattr(checkpoint, "quit_vm", recorded("quit", checkpoint.quit_vm))
    monkeypatch.setattr(checkpoint, "publish", lambda staging, directory, force, real=checkpoint.publish:
                        (events.append(("publish", None)), real(staging, directory, force))[1])
    monkeypatch.setattr(checkpoint, "check_cluster", lambda config, info: None)
    monkeypatch.setattr(checkpoint, "write_manifest", lambda staging, info, saved, stamps=None, extra=None: {"vms": sorted(saved)})
    said = []
    app = SimpleNamespace(config=None, info=said.append, warn=said.append)
    targets = SimpleNamespace(jobid=7, info={}, vms=vms, ranks=list(range(4)), connect=connect)
    yield SimpleNamespace(app=app, targets=targets, monitors=monitors, stopped=stopped, events=events, failing=failing,
                          connections=connections, said=said, directory=str(tmp_path / "ckpt"), drains=drains,
                          hooks=hooks, servers=servers)
    for s in servers:
        s.stop(timeout=2, drain=0.5)


def test_every_vm_is_checkpointed_through_one_connection(cluster):
    assert relay.depth(relay.plan(cluster.targets.vms)) == 3
    manifest = saving.take_checkpoint(cluster.app, cluster.targets, cluster.directory, force=False)
    assert manifest == {"vms": [0, 1, 2, 3]}
    assert len(cluster.connections) == 1  # the CLI's only TLS connection: the first host's leader
    assert sorted(os.listdir(cluster.directory)) == [f"memory-vm{r}" for r in range(4)]
    assert cluster.stopped == [[False]] * 4  # every qemu stopped once
    kinds = [what for what, _ in cluster.events]
    assert kinds == ["pause"] * 4 + ["save"] * 4 + ["publish"] + ["quit"] * 4  # all paused before any writes; quit last
    assert all("cont" not in m.log for m in cluster.monitors)
    # the hosts' leaders (vm0, vm2) still relay the others' answers when their own qemu is gone
    assert sorted(cluster.drains) == [("vm0", relay.OPEN_TIMEOUT), ("vm1", 3.0), ("vm2", relay.OPEN_TIMEOUT), ("vm3", 3.0)]


def test_a_vm_that_fails_its_save_resumes_every_vm_and_writes_nothing(cluster):
    cluster.failing.add("vm3")
    with pytest.raises(PcoccError, match=r"checkpoint failed \(checkpoint\): vm3: no space left on device$"):
        saving.take_checkpoint(cluster.app, cluster.targets, cluster.directory, force=False)
    assert not os.path.exists(cluster.directory)
    assert [n for n in os.listdir(os.path.dirname(cluster.directory)) if n.startswith(".ckpt.partial")] == []
    assert all(m.status == "running" for m in cluster.monitors)
    assert cluster.stopped == [[]] * 4


def test_a_cli_gone_after_the_pause_leaves_every_vm_running(cluster):
    """The CLI killed while the VMs are paused (its connection closed, no resume sent): each
    relay sees its upstream leave and closes its VMs' streams, and each VM resumes by itself."""
    streams = saving._Streams(cluster.targets)
    try:
        paused = streams.next("paused", timeout=10)
        assert paused == {f"vm{r}": (True, True) for r in range(4)}
        assert all(m.status == "paused" for m in cluster.monitors)
    finally:
        streams.close()
    for m in cluster.monitors:
        wait_until(lambda: m.status == "running", "every VM resumed once its stream ended")
    assert cluster.stopped == [[]] * 4


def test_a_relay_lost_during_the_save_fails_the_checkpoint_and_every_vm_resumes(cluster):
    """h1's leader (vm2) goes while the VMs save (its endpoint stops: its node lost, as far as
    the others see): its VMs get an error each, through vm0's relay, and resume by themselves
    (their streams end); the others are told to resume; nothing is published."""
    lost = threading.Event()

    def lose_h1():
        threading.Thread(target=lambda: (cluster.servers[2].stop(timeout=2, drain=0), lost.set()), daemon=True).start()

    cluster.hooks["vm0"] = lose_h1
    cluster.hooks["vm2"] = cluster.hooks["vm3"] = lambda: lost.wait(10)  # still saving when h1's leader goes
    with pytest.raises(PcoccError, match=r"checkpoint failed \(checkpoint\): vm[23]: relay vm2 on h1 lost"):
        saving.take_checkpoint(cluster.app, cluster.targets, cluster.directory, force=False)
    for m in cluster.monitors:
        wait_until(lambda: m.status == "running", "every VM resumed")
    assert cluster.stopped == [[]] * 4 and not os.path.exists(cluster.directory)


def test_a_second_ctrl_c_while_the_vms_resume_still_leaves_nothing(cluster, monkeypatch):
    """Review: a second Ctrl-C (or SIGTERM, SIGHUP: they interrupt as Ctrl-C does) during the
    wait for the resumes skipped the cleanup: the hidden staging directory stayed, with VM files."""
    real = saving._Streams.next

    def next_(self, key, timeout, until_failure=False):
        if key is None:  # the wait for the resumes
            raise KeyboardInterrupt
        return real(self, key, timeout, until_failure)

    monkeypatch.setattr(saving._Streams, "next", next_)
    cluster.failing.add("vm3")
    with pytest.raises(KeyboardInterrupt):
        saving.take_checkpoint(cluster.app, cluster.targets, cluster.directory, force=False)
    parent = os.path.dirname(cluster.directory)
    assert [n for n in os.listdir(parent) if ".partial-" in n] == [] and not os.path.exists(cluster.directory)
    for m in cluster.monitors:
        wait_until(lambda: m.status == "running", "every VM resumed once its stream ended")


def test_sigterm_during_a_checkpoint_interrupts_it_as_ctrl_c(cluster):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    cluster.hooks["vm0"] = lambda: os.kill(os.getpid(), signal.SIGTERM)  # as the VMs save
    with pytest.raises(KeyboardInterrupt):
        saving.take_checkpoint(cluster.app, cluster.targets, cluster.directory, force=False)
    assert signal.getsignal(signal.SIGTERM) == before  # given back
    parent = os.path.dirname(cluster.directory)
    assert [n for n in os.listdir(parent) if ".partial-" in n] == [] and not os.path.exists(cluster.directory)
    for m in cluster.monitors:
        wait_until(lambda: m.status == "running", "every VM resumed")
