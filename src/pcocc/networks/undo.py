"""The undo log: every host object a node setup makes, recorded before it is made.

One file per job in the node state dir (undo-<jobid>.json), JSON lines: one record
{"kind", "args"} per line, appended and fsync'd on each record (the directory too when
the file is made), so that after a crash, even a SIGKILL between the record and the
creation, the log names everything that may exist. A record costs one short write
whatever the log's length (a node with thousands of objects). A crash in the middle of
an append leaves a torn last line: its object was never made (its record had not
returned), so reading ignores it, and the next record first cuts it off.

A log written by an older pcocc (one JSON document {"job", "entries": [...]}, rewritten
whole on each record) is read as it is, and rewritten as JSON lines by the first record
or replay that changes it.

Replaying it runs each undo action in reverse order; the actions are
idempotent (an object already gone is fine), so a replay can run any number
of times, also over a half-finished one.
"""

import json
import logging
import os
import re
import time

from pcocc.errors import PcoccError
from pcocc.fsutil import fsync_dir

log = logging.getLogger("pcocc.undo")

_FILE = re.compile(r"undo-(\d+)\.json")


class UndoError(PcoccError):
    """Some objects could not be removed; they stay in the log for the next replay."""


class UndoLog:
    def __init__(self, directory):
        self.dir = directory

    def path(self, job):
        return os.path.join(self.dir, f"undo-{int(job)}.json")

    def entries(self, job):
        """The job's records, oldest first ([] when it has none): [{"kind": str, "args": {}}].
        A torn last line (a crash during its append) is left out; so is any line that is not
        a record, with a warning."""
        try:
            with open(self.path(job), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        return _parse(data, self.path(job))

    def jobs(self):
        """The job ids that have a log on this node."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_FILE.fullmatch, names) if m)

    def record(self, job, kind, **args):
        """Record an object of the job before making it: one line appended and fsync'd.
        args: JSON-able keyword arguments of the kind's undo action. Raises OSError when the
        state dir cannot be written (then the object must not be made)."""
        line = (json.dumps({"kind": kind, "args": args}, separators=(",", ":")) + "\n").encode()
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        path = self.path(job)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                fsync_dir(self.dir)  # a new file: its name is durable before its first record counts
            elif os.pread(fd, 1, size - 1) != b"\n" or os.pread(fd, 2, 0) == _OLD_START:
                # a torn last line, or an older pcocc's log (whatever its last byte: a line
                # appended to it would make the whole file unreadable)
                os.close(fd)
                fd = -1
                self._write(job, self.entries(job))
                fd = os.open(path, os.O_RDWR | os.O_APPEND, 0o600)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def replay(self, job, actions, deadline=None):
        """Undo the job's objects, newest first, with actions[kind](**args); then drop the log.

        Every entry is tried, until `deadline` (a time.monotonic() value) if given: the
        ones that fail, and those not tried by then, stay in the log, and UndoError names them.
        """
        entries = self.entries(job)
        failed = []
        for i, entry in enumerate(reversed(entries)):
            if deadline is not None and time.monotonic() >= deadline:
                left = list(reversed(entries))[i:]
                log.warning("job %s: deadline reached, %d object(s) not tried", job, len(left))
                failed += [(e, "not tried: teardown deadline reached") for e in left]
                break
            action = actions.get(entry["kind"])
            try:
                if action is None:
                    raise PcoccError(f"no undo action for objects of kind '{entry['kind']}'")
                action(**entry["args"])
            except (PcoccError, OSError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                log.warning("job %s: cannot undo %s %s: %s", job, entry["kind"], entry["args"], message)
                failed.append((entry, message))
        if failed:
            self._write(job, [e for e, _ in reversed(failed)])
            details = "; ".join(f"{e['kind']} {_describe(e['args'])}: {msg}" for e, msg in reversed(failed))
            raise UndoError(f"job {job}: {len(failed)} object(s) not removed: {details}")
        self.drop(job)

    def drop(self, job):
        try:
            os.unlink(self.path(job))
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    def _write(self, job, entries):
        """Replace the job's log by these entries, as JSON lines, atomically (rename)."""
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        path = self.path(job)
        tmp = os.path.join(self.dir, f".{os.path.basename(path)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join((json.dumps(e, separators=(",", ":")) + "\n").encode() for e in entries))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)


_OLD_START = b"{\n"  # an older pcocc's json.dump(indent=1): never the start of a JSON line


def _parse(data, path):
    """The records of a log's bytes: JSON lines, or an older pcocc's single document (then
    any JSON lines after it: what a record appended to it before this rule)."""
    old = []
    if data.startswith(_OLD_START):
        try:
            doc, end = json.JSONDecoder().raw_decode(data.decode())
            old, data = list(doc["entries"]), data.decode()[end:].lstrip("\n").encode()
        except (ValueError, KeyError, TypeError):
            log.warning("%s: not an undo log pcocc can read: ignored", path)
            return []
        if not data:
            return old
    lines = data.split(b"\n")
    if lines[-1]:
        log.info("%s: its last record was cut by a crash (its object was never made): ignored", path)
    out = []
    for n, line in enumerate(lines[:-1], 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str) or not isinstance(entry.get("args"), dict):
                raise ValueError("not a record")
        except ValueError:
            log.warning("%s:%d: not an undo record: ignored", path, n)
            continue
        out.append(entry)
    return old + out


def _describe(args):
    return ",".join(f"{k}={v}" for k, v in args.items())
