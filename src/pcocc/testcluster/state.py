"""The harness's record of what it made, written before each thing is made.

`down` undoes exactly what is in this file, so it works after a partial `up`
or a crash, and never touches another harness's objects.
"""

import json
import os
from pathlib import Path

STATE_FILE = "state.json"


class State:
    """A JSON document of lists and process entries, saved atomically on every change."""

    def __init__(self, base):
        self.base = Path(base)
        self.path = self.base / STATE_FILE
        self.data = {"processes": [], "netns": [], "links": [], "users": []}

    @classmethod
    def load(cls, base):
        state = cls(base)
        if state.path.exists():
            state.data.update(json.loads(state.path.read_text()))
        return state

    def exists(self):
        return self.path.exists()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def set(self, **values):
        self.data.update(values)
        self.save()

    def add(self, kind, item):
        """Record item in the list `kind` (before making it)."""
        if item not in self.data[kind]:
            self.data[kind].append(item)
            self.save()

    def add_process(self, name, pidfile=None):
        """Record a process about to start; its pid is filled in by set_pid()."""
        entry = {"name": name, "pid": None, "pidfile": str(pidfile) if pidfile else None}
        self.data["processes"].append(entry)
        self.save()
        return entry

    def set_pid(self, entry, pid, start):
        entry["pid"], entry["start"] = pid, start
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)
