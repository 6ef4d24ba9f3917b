"""The cores and memory that the local backend's clusters hold on this host, for all users.

There is no root daemon on a workstation, and each user's state store is the
user's own, so the host's accounting lives in files that every user can read:
one file per user in a directory shared by all (default ``/dev/shm``: owned by
root, sticky, world-writable, and emptied at boot, as reservations should be).

- A file's owner (``fstat``), not its name, says whose reservations it holds:
  a user can write only his own files, and the sticky bit stops him from
  removing or renaming another's. Names carry a random part, so no one can
  take another user's name first. A user who lies in his own file only skews
  the count, which is acceptable for a workstation.
- A reservation names the processes that hold it, each as (pid, start time);
  it counts while one of them runs (a SIGKILLed cluster frees its share by
  itself; its owner prunes the entry at its next write).
- A decision (read every file, check the request fits, write one's own file)
  is made under an exclusive ``flock(2)`` of the directory itself, which any
  user can open; the write is a rename of a new file, so readers never see
  half of one.
"""

import contextlib
import fcntl
import json
import os
import secrets
import stat
import time

from pcocc.errors import ResourceError
from pcocc.procs import pid_alive

DEFAULT_DIR = "/dev/shm"
PREFIX = "pcocc-resv."
LOCK_TIMEOUT = 60.0  # seconds: a decision takes milliseconds; this bounds a stuck or hostile holder
MAX_FILE = 1 << 20  # bytes: larger files are not ours, and are ignored


class HostReservations:
    """Reservations of this host in directory `path`, for the calling user (uid).

    Entries: {"user:jobid": {"owners": [[pid, start], ...], "cores": [[core, ...] per VM], "memory_mb": int}}.
    """

    def __init__(self, path=DEFAULT_DIR, uid=None):
        self.path = path
        self.uid = os.getuid() if uid is None else uid

    # -- locking
    @contextlib.contextmanager
    def locked(self, timeout=LOCK_TIMEOUT):
        """Hold the host-wide lock; ResourceError when it cannot be had in `timeout` seconds."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise ResourceError(f"cannot open the host reservations directory {self.path}: {exc.strerror}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ResourceError(f"the host reservations in {self.path} stayed locked for {timeout:.0f} s "
                                            "(another process holds flock on the directory)") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)

    # -- reading
    def _files(self):
        try:
            names = os.listdir(self.path)
        except OSError as exc:
            raise ResourceError(f"cannot read the host reservations directory {self.path}: {exc.strerror}") from None
        return sorted(n for n in names if n.startswith(PREFIX) and n.endswith(".json"))

    def _read(self, name):
        """(owner uid, entries) of one file, or None when it is not a plain, small, valid file."""
        try:
            fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
                return None
            data = json.loads(os.read(fd, MAX_FILE + 1))
            return st.st_uid, data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def all_live(self):
        """[(uid, key, entry)] of every user's reservations that are still held."""
        out = []
        for name in self._files():
            got = self._read(name)
            if got is None:
                continue
            uid, entries = got
            for key, entry in entries.items():
                entry = valid_entry(entry)
                if entry is not None and _held(entry):
                    out.append((uid, key, entry))
        return out

    def mine(self):
        """{key: entry} of the calling user's files, held or not (malformed entries dropped)."""
        out = {}
        for name in self._own_files():
            got = self._read(name)
            if got:
                out.update({k: e for k, e in ((k, valid_entry(v)) for k, v in got[1].items()) if e is not None})
        return out

    def _own_files(self):
        own = []
        for name in self._files():
            if not name.startswith(f"{PREFIX}{self.uid}."):
                continue
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(self.path, name))
                if stat.S_ISREG(st.st_mode) and st.st_uid == self.uid:
                    own.append(name)
        return own

    # -- writing (under the lock)
    def write(self, entries):
        """Replace the calling user's reservations by `entries` (dropping those no longer held)."""
        entries = {k: v for k, v in entries.items() if valid_entry(v) is not None and _held(v)}
        own = self._own_files()
        if not entries:  # nothing held: no file (a user's last cluster leaves nothing in the shared directory)
            for name in own:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
            return
        target = own[0] if own else f"{PREFIX}{self.uid}.{secrets.token_hex(8)}.json"
        tmp = os.path.join(self.path, f"{PREFIX}{self.uid}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: every user reads everyone's
            os.write(fd, json.dumps(entries, sort_keys=True).encode())
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, os.path.join(self.path, target))
        for stale in own[1:]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.path, stale))

    def change(self, fn):
        """Under the lock: entries = fn(all_live, mine); write them as the user's. Returns fn's result."""
        with self.locked():
            new = fn(self.all_live(), self.mine())
            self.write(new)
            return new


def _int(value, minimum=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def valid_entry(entry):
    """The entry if it has the expected shape, else None: files are written by other users,
    whose mistakes or lies must skew the count at most, never break or stall a reader.

    Shape: {"owners": [[pid > 0, start >= 0], ...], "cores": [[core >= 0, ...] per VM], "memory_mb": int >= 0}.
    """
    if not isinstance(entry, dict):
        return None
    owners, cores, memory = entry.get("owners"), entry.get("cores", []), entry.get("memory_mb", 0)
    if not (isinstance(owners, list) and all(isinstance(o, list) and len(o) == 2 and _int(o[0], 1) and _int(o[1]) for o in owners)):
        return None
    if not (isinstance(cores, list) and all(isinstance(c, list) and all(_int(x) for x in c) for c in cores)):
        return None
    if not _int(memory):
        return None
    return {"owners": owners, "cores": cores, "memory_mb": memory}


def _held(entry):
    return any(pid_alive(pid, start) for pid, start in entry["owners"])
