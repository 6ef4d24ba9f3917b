"""The local backend's host-wide accounting and its safe file handling, without VMs."""

import json
import os
import subprocess
import sys

import pytest

from pcocc.batch.hostres import HostReservations
from pcocc.batch.local import open_output, place
from pcocc.errors import ResourceError
from pcocc.procs import pid_alive, process_start


def me():
    return [os.getpid(), process_start(os.getpid())]


@pytest.fixture
def shared_dir():
    """A directory like /dev/shm (root-owned, sticky, world-writable), reachable by every user
    (pytest's own tmp_path is under a directory only its user can enter)."""
    import shutil
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="pcocc-test-shm-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_refusal_counts_the_free_slots_before_placing_any_vm():
    use = {0: 0, 1: 0}
    with pytest.raises(ResourceError) as exc:
        place([0, 1], use, 2, 5, 1)  # 4 slots, 5 VMs
    assert "4 vCPU slots free" in exc.value.message


def test_placement_spreads_vms_over_the_least_used_cores():
    use = {0: 1, 1: 0, 2: 0}
    assert place([0, 1, 2], use, 2, 2, 1) == [[1], [2]]
    assert use == {0: 1, 1: 1, 2: 1}


def test_a_reservation_counts_while_one_of_its_owners_runs(shared_dir):
    res = HostReservations(str(shared_dir))
    res.change(lambda live, mine: {**mine, "a": {"owners": [me()], "cores": [[0]], "memory_mb": 100}})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    res.change(lambda live, mine: {**mine, "b": {"owners": [[dead_pid, 1]], "cores": [[1]], "memory_mb": 100}})
    live = res.all_live()
    assert [(k, e["memory_mb"]) for _, k, e in live] == [("a", 100)]
    # the dead one is pruned at the next write
    res.change(lambda live, mine: mine)
    assert set(res.mine()) == {"a"}
    assert not pid_alive(dead_pid, 1)
    # the last one released: the user's file goes (the shared directory keeps nothing of a user without clusters)
    res.change(lambda live, mine: {})
    assert res.mine() == {} and [n for n in os.listdir(shared_dir) if n.startswith("pcocc-resv.")] == []


def _as_nobody(fn):
    """Run fn() in a child that has become `nobody`; its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = fn() or 0
        except BaseException as exc:  # noqa: BLE001
            print(f"child: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_two_users_share_one_host_s_capacity(shared_dir):
    """Section 4 of issue 12 (r10): reservations are per host, for all users, without a daemon."""
    root_res = HostReservations(str(shared_dir))
    root_res.change(lambda live, mine: {**mine, "j1": {"owners": [me()], "cores": [[0], [1]], "memory_mb": 700}})

    def other_user():
        res = HostReservations(str(shared_dir))
        seen = {(uid, key): e["memory_mb"] for uid, key, e in res.all_live()}
        if seen != {(0, "j1"): 700}:
            return 3
        # he writes his own file, and cannot touch root's
        res.change(lambda live, mine: {**mine, "j9": {"owners": [[os.getppid(), process_start(os.getppid())]], "cores": [[0]], "memory_mb": 50}})
        roots = [n for n in os.listdir(shared_dir) if n.startswith("pcocc-resv.0.")]
        try:
            os.unlink(shared_dir / roots[0])
            return 4
        except PermissionError:
            pass
        return 0

    assert _as_nobody(other_user) == 0
    seen = {(uid, key): e["memory_mb"] for uid, key, e in root_res.all_live()}
    assert seen == {(0, "j1"): 700, (65534, "j9"): 50}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_a_file_named_for_another_user_counts_as_its_owner_s(shared_dir):
    """What a file holds counts for the user who owns it, whatever its name says."""

    def liar():
        path = shared_dir / "pcocc-resv.0.forged.json"
        path.write_text(json.dumps({"x": {"owners": [[os.getppid(), process_start(os.getppid())]], "cores": [], "memory_mb": 5}}))
        return 0

    assert _as_nobody(liar) == 0
    res = HostReservations(str(shared_dir))
    assert [(uid, key) for uid, key, _ in res.all_live()] == [(65534, "x")]
    assert res.mine() == {}  # root's own reservations do not include the forged file
    res.change(lambda live, mine: {**mine, "r": {"owners": [me()], "cores": [], "memory_mb": 1}})
    assert (shared_dir / "pcocc-resv.0.forged.json").exists()  # not root's to overwrite
    assert {key for _, key, _ in res.all_live()} == {"x", "r"}


def test_batch_output_is_never_written_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "pcocc_1.out"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        open_output(str(link))
    hard = tmp_path / "pcocc_2.out"
    os.link(victim, hard)
    with pytest.raises(OSError):
        open_output(str(hard))
    assert victim.read_text() == "precious\n"
    fifo = tmp_path / "pcocc_3.out"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        open_output(str(fifo))  # and it does not block


def test_batch_output_replaces_an_old_file_of_ours(tmp_path):
    out = tmp_path / "pcocc_4.out"
    out.write_text("an older job's output, longer than the new one\n")
    with open_output(str(out)) as f:
        f.write(b"new\n")
    assert out.read_text() == "new\n"


@pytest.mark.parametrize("entry", [
    {"owners": "x"}, {"owners": 7}, {"owners": [[1, 0]], "memory_mb": "x"}, {"owners": [[1, 0]], "cores": 5},
    {"owners": [[1, 0]], "cores": [[[0]]]}, {"owners": [["../tmp/x", 0]]}, {"owners": [[True, 0]]},
    {"owners": [[1, "0"]]}, {"owners": [[1, 0]], "memory_mb": -5}, [1, 2], "text", None,
])
def test_a_malformed_reservation_of_another_user_is_ignored(shared_dir, entry):
    """Reviewer's F1/F2: another user's file must skew the count at most, never break a reader,
    make it open a path of his choosing (a pid like '../tmp/x' named a FIFO: readers hung), or crash it."""
    (shared_dir / "pcocc-resv.999.x.json").write_text(json.dumps({"k": entry}))
    res = HostReservations(str(shared_dir))
    assert res.all_live() == []
    new = res.change(lambda live, mine: {**mine, "r": {"owners": [me()], "cores": [[0]], "memory_mb": 1}})
    assert set(new) == {"r"}


def test_pid_alive_takes_only_positive_integers():
    assert pid_alive(os.getpid()) and pid_alive(os.getpid(), process_start(os.getpid()))
    for pid in ("1", "../self", 1.0, True, -1, 0, None, [1]):
        assert not pid_alive(pid)
    assert not pid_alive(os.getpid(), "0")


def test_cleanup_removes_the_run_dir_even_when_the_reservations_stay_locked(tmp_path, monkeypatch):
    """Reviewer's F3: with the host lock held by another user, the run dir leaked for ever
    (its records were gone, so nothing named it any more)."""
    from types import SimpleNamespace

    from pcocc import state
    from pcocc.batch.local import LocalBackend
    from pcocc.store.sqlite import SqliteStore

    settings = {"cpu-overcommit": 2, "reservation-dir": str(tmp_path)}
    ctx = SimpleNamespace(env=SimpleNamespace(user="alice"), store=SqliteStore(str(tmp_path / "s.db")),
                          config=SimpleNamespace(batch=SimpleNamespace(settings=settings)))
    backend = LocalBackend(ctx)
    monkeypatch.setattr(backend, "_undo_setup", lambda jobid: None)

    def locked(fn):
        raise ResourceError("the host reservations stayed locked")

    monkeypatch.setattr(backend.reservations, "change", locked)
    rundir = tmp_path / "job_3"
    (rundir / "vm0").mkdir(parents=True)
    ctx.store.put(state.cluster_prefix("alice", 3) + "info", {"jobid": 3, "rundir": str(rundir)})
    backend._cleanup(3, str(rundir))
    assert not rundir.exists()
    assert ctx.store.range(state.cluster_prefix("alice", 3)) == {}
    assert ctx.store.get(state.history_key("alice", 3))["jobid"] == 3


def test_the_agent_wait_counts_console_silence_not_time_since_start(tmp_path):
    """A guest that keeps printing on a loaded host is still booting: its bound restarts."""
    from pcocc.lifecycle.vmrun import _ConsoleQuiet

    log = tmp_path / "console.log"
    quiet = _ConsoleQuiet(str(log))
    first = quiet.since()
    assert quiet.since() == first  # no file, no change
    log.write_text("Linux version ...\n")
    grown = quiet.since()
    assert grown >= first and quiet.since() == grown
    with open(log, "a") as f:
        f.write("more\n")
    assert quiet.since() >= grown and quiet.size == log.stat().st_size


def test_a_clusters_end_is_written_once_to_its_batch_output(tmp_path):
    """A reclaim racing the supervisor's own cleanup (a loaded host) must not add a second end."""
    from pcocc.batch.local import _append_end

    out = tmp_path / "pcocc_5.out"
    out.write_text("script on vm0\n")
    _append_end(str(out), 5, "COMPLETED", "the batch script exited with status 0")
    _append_end(str(out), 5, "FAILED", "its supervisor was gone")
    assert out.read_text().splitlines() == ["script on vm0", "pcocc: cluster 5 ended: COMPLETED (the batch script exited with status 0)"]
