"""The undo log: every host object a node setup makes, recorded before it is made.

One JSON file per job in the node state dir (undo-<jobid>.json), rewritten
atomically and fsync'd on each record, so that after a crash, even a SIGKILL
between the record and the creation, the log names everything that may exist.
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
        """The job's records, oldest first ([] when it has none)."""
        try:
            with open(self.path(job)) as f:
                return json.load(f)["entries"]
        except FileNotFoundError:
            return []

    def jobs(self):
        """The job ids that have a log on this node."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_FILE.fullmatch, names) if m)

    def record(self, job, kind, **args):
        """Record an object of the job before making it."""
        self._write(job, self.entries(job) + [{"kind": kind, "args": args}])

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
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        path = self.path(job)
        tmp = os.path.join(self.dir, f".{os.path.basename(path)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"job": int(job), "entries": entries}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)


def _describe(args):
    return ",".join(f"{k}={v}" for k, v in args.items())


