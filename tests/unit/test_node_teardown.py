"""The pieces of the SLURM node teardown that need no cluster: the undo log's deadline,
the hard deadline of `setup delete`, the run dir rule, and the bound on a job's end."""

import os
import time

import pytest

from pcocc.batch.slurm import end_bound
from pcocc.errors import PcoccError
from pcocc.lifecycle import nodesetup
from pcocc.networks.undo import UndoError, UndoLog


def test_replay_stops_at_its_deadline_and_keeps_what_it_did_not_try(tmp_path):
    log, done = UndoLog(str(tmp_path)), []
    for i in range(4):
        log.record(7, "thing", n=i)
    deadline = time.monotonic() + 3600

    def undo(n):
        done.append(n)
        if n == 2:  # the clock runs out during this one
            nonlocal deadline
            deadline = time.monotonic() - 1

    # the deadline is read before each entry: one whose value moves, as if the clock ran out
    entries = log.entries(7)
    with pytest.raises(UndoError, match=r"2 object\(s\) not removed: thing n=0: not tried.*n=1: not tried"):
        log.replay(7, {"thing": undo}, deadline=_Deadline(lambda: deadline))
    assert done == [3, 2]
    assert [e["args"]["n"] for e in log.entries(7)] == [0, 1]
    assert len(entries) == 4


class _Deadline(float):
    """A deadline read as a float in comparisons, whose value can move (for the test)."""

    def __new__(cls, get):
        obj = super().__new__(cls, 0.0)
        obj.get = get
        return obj

    def __le__(self, other):
        return self.get() <= other

    def __ge__(self, other):
        return self.get() >= other

    def __lt__(self, other):
        return self.get() < other

    def __gt__(self, other):
        return self.get() > other


def test_hard_deadline_interrupts_a_command_and_kills_it(tmp_path):
    from pcocc.runner import run

    pidfile = tmp_path / "pid"
    with pytest.raises(nodesetup.DeadlineExceeded):
        with nodesetup._hard_deadline(0.5):
            run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"])
    pid = int(pidfile.read_text())
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    assert isinstance(nodesetup.DeadlineExceeded("x"), PcoccError)  # an undo step that runs out counts as failed


def test_no_deadline_means_no_alarm():
    with nodesetup._hard_deadline(None) as until:
        assert until is None
        time.sleep(0.05)


def test_task_run_dir_follows_the_users_variables(tmp_path):
    uid = os.getuid()
    assert nodesetup.task_run_dir({"PCOCC_RUN_DIR": "/x/run"}, uid, 12) == "/x/run/job_12"
    assert nodesetup.task_run_dir({"HOME": "/home/u"}, uid, 12) == f"/tmp/pcocc-{uid}/job_12"
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    assert nodesetup.task_run_dir({"XDG_RUNTIME_DIR": str(xdg)}, uid, 3) == f"{xdg}/pcocc/job_3"
    xdg.chmod(0o755)  # not private: not used
    assert nodesetup.task_run_dir({"XDG_RUNTIME_DIR": str(xdg)}, uid, 3) == f"/tmp/pcocc-{uid}/job_3"
    assert nodesetup.task_environ({"PCOCC_TASK_HOME": "/h", "HOME": "/root"}) == {"HOME": "/h"}
    assert nodesetup.task_environ({"HOME": "/root"}) is None


def test_end_bound_adds_slurms_limits_with_their_defaults():
    assert end_bound({"KillWait": "45 sec", "UnkillableStepTimeout": "120 sec", "PrologEpilogTimeout": "180",
                      "MessageTimeout": "20 sec"}) == 365
    # unset PrologEpilogTimeout shows as 65534: no bound in SLURM, 300 s here
    assert end_bound({"PrologEpilogTimeout": "65534"}) == 30 + 60 + 300 + 10


def test_processes_naming_a_run_dir_are_killed_before_it_goes_and_only_the_users(tmp_path):
    """A qemu still exiting at the job's end (its task SIGKILLed) is killed and waited for by the
    run dir's removal; another uid's process naming the same path is left alone."""
    import subprocess
    import sys

    from pcocc.procs import kill_processes_naming, pid_alive

    run_dir = tmp_path / "job_7"
    (run_dir / "vm0").mkdir(parents=True)
    argv = [sys.executable, "-c", "import time; time.sleep(600)", str(run_dir / "vm0" / "disk.qcow2")]
    proc = subprocess.Popen(argv)
    try:
        assert kill_processes_naming(str(run_dir), os.getuid() + 4242) == []  # another uid's: untouched
        assert pid_alive(proc.pid)
        assert kill_processes_naming(str(tmp_path / "job_70"), os.getuid()) == []  # a prefix is not the dir
        assert pid_alive(proc.pid)
        assert kill_processes_naming(str(run_dir), os.getuid()) == []
        assert proc.wait(30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_teardown_finds_a_run_dir_the_tasks_put_elsewhere(tmp_path, monkeypatch):
    """Without PCOCC_RUN_DIR or XDG_RUNTIME_DIR, root's setup and the job's tasks apply the
    run dir rule at their own moment: another user who makes or removes /tmp/pcocc-<uid> in
    between sends the tasks to ~/.cache/pcocc/run-<host> (or back). The setup records every
    candidate; the teardown removes the job's dir wherever it is (review finding)."""
    import pwd
    import socket
    from types import SimpleNamespace

    from pcocc import fsutil

    uid = os.getuid()
    home = tmp_path / "home"
    monkeypatch.setattr(fsutil, "TMP", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(pwd, "getpwuid", lambda u: SimpleNamespace(pw_dir=str(home), pw_gid=os.getgid()))
    env = {"HOME": str(home)}
    at_setup = nodesetup.task_run_dir(env, uid, 5)
    assert at_setup == str(tmp_path / "tmp" / f"pcocc-{uid}" / "job_5")
    moved = home / ".cache" / "pcocc" / f"run-{socket.gethostname().split('.')[0]}" / "job_5"
    assert nodesetup.task_run_dirs(env, uid, 5) == [at_setup, str(moved)]
    (moved / "vm0").mkdir(parents=True)  # where the tasks went after a squat of /tmp/pcocc-<uid>
    (moved / "vm0" / "disk.qcow2").write_text("x")
    nodesetup.remove_run_dir(at_setup, uid, alternates=[str(moved)])
    assert not moved.exists() and moved.parent.is_dir()
    assert nodesetup.task_run_dirs({"PCOCC_RUN_DIR": "/x"}, uid, 5) == ["/x/job_5"]  # decided by the user: one place
