"""Start daemons in the foreground (exact pids) and stop them by pid."""

import os
import signal
import subprocess
import time


def spawn(state, name, argv, log, *, pidfile=None, env=None, user=None, group=None):
    """Start argv detached from our session, stdout+stderr to log; record it first."""
    entry = state.add_process(name, pidfile)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            user=user,
            group=group,
            extra_groups=[] if user else None,
            start_new_session=True,  # Ctrl-C on `up` must not kill the cluster
        )
    state.set_pid(entry, proc.pid, process_start_time(proc.pid))
    return proc


def alive(pid):
    """True while pid runs; a zombie counts as dead (PID 1 here reaps late)."""
    _reap(pid)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return False


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: PID 1 will reap it
        pass


def stop(pids, timeout=5.0):
    """SIGTERM the pids, wait for them, then SIGKILL what is left."""
    pids = [p for p in pids if p and alive(p)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if alive(p)]
        if pids:
            time.sleep(0.02)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if alive(p)]
        if pids:
            time.sleep(0.02)
    return pids  # still alive after SIGKILL (should not happen)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def read_pidfile(path):
    try:
        return int(open(path).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def session_members(leaders):
    """Pids whose session is led by one of leaders (spawn() starts each daemon in its own session)."""
    leaders = {p for p in leaders if p}
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in leaders:
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) in leaders:
                        members.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return members


def process_start_time(pid):
    """Clock ticks since boot when pid started: tells a recorded pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def tail(path, lines=3):
    """The last lines of a log, on one line, for an error message."""
    try:
        return " / ".join(open(path, errors="replace").read().strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"
