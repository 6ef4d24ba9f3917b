"""Which processes are alive, named for good by (pid, start time); dying with one's parent.

A pid alone can be reused by another process after its owner died; the start
time read from /proc/PID/stat (field 22, clock ticks since boot: proc(5)) makes
the pair unique until the host reboots.
"""

import os


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (state is [0]): proc(5)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_start(pid):
    """When pid started (clock ticks since boot), or None when there is no such process."""
    if not _is_int(pid) or pid <= 0:
        return None
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def pid_alive(pid, start=None):
    """True for a running process (a zombie counts as dead); with start, only that very process.

    pid must be a positive int and start an int or None (anything else is no process: the
    pair may come from a file another user wrote, and must not name a path)."""
    if not _is_int(pid) or pid <= 0 or not (start is None or _is_int(start)):
        return False
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)


def descendants(pid):
    """[(pid, start)] of pid's living descendants now (children first), from the parent links
    of /proc/*/stat (field 4: proc(5)); a process that ends meanwhile is left out."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = _stat_fields(int(name))
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append((int(name), int(fields[19])))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child[0])
    return out


def shell_status(returncode):
    """A subprocess returncode as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = None


def load():
    """Load libc for set_parent_death_signal: call it before a fork (a preexec_fn must not import)."""
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def set_parent_death_signal(sig):
    """Ask the kernel to send `sig` to this process when its parent thread dies (prctl(2)
    PR_SET_PDEATHSIG). The caller checks os.getppid() afterwards: a parent that died
    before the call is not signalled. Raises OSError when the kernel refuses."""
    import ctypes

    if load().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def dying_with_parent(sig=None):
    """Popen keyword arguments that make the child get `sig` (default SIGKILL) when the
    calling thread's process dies, and die at once if it already has (a race with the fork)."""
    import signal

    sig = signal.SIGKILL if sig is None else sig
    load()
    parent = os.getpid()

    def preexec():
        set_parent_death_signal(sig)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return {"preexec_fn": preexec}


def wait_status_text(status):
    """How a process ended, from its wait status (os.waitpid's, or SLURM's task exit status):
    'its process was killed by signal 9 (SIGKILL)' or 'its process exited with status 3'."""
    import signal

    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = f" ({signal.Signals(sig).name})" if sig in signal.valid_signals() else ""
        return f"its process was killed by signal {sig}{name}"
    return f"its process exited with status {os.WEXITSTATUS(status)}"


def kill_processes_naming(path, uid, timeout=30.0):
    """SIGKILL every process of `uid` whose command line names a file under `path` (a job's
    run dir: its qemus name their disks and sockets there), and wait until they are gone.

    For the job's end on a node: a qemu whose VM task was SIGKILLed dies by its parent-death
    signal, but may still be exiting when SLURM's step is over (proctrack/linuxproc loses a
    child once its parent died). Returns the pids still alive after `timeout` seconds ([] when
    every one went). Only uid's processes are touched: nothing another user runs.
    """
    import signal
    import time

    needle = os.path.normpath(path).encode() + b"/"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle not in f.read():
                    continue
            start = process_start(pid)
            os.kill(pid, signal.SIGKILL)
            found.append((pid, start))
        except OSError:
            continue
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid, start in found if pid_alive(pid, start)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)
