"""The process's outside world in one object: streams, config dirs, user.

Tests build their own Environment instead of patching globals.
"""

import os
import pwd
import sys
from dataclasses import dataclass, field


def _user_entry():
    try:
        return pwd.getpwuid(os.getuid())
    except KeyError:  # a uid with no passwd entry (containers)
        return None


@dataclass
class Environment:
    stdout: object = field(default_factory=lambda: sys.stdout)
    stderr: object = field(default_factory=lambda: sys.stderr)
    environ: dict = field(default_factory=lambda: dict(os.environ))
    uid: int = field(default_factory=os.getuid)
    user: str = ""
    home: str = ""
    _run_dir: str = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        entry = _user_entry() if self.uid == os.getuid() else None
        if not self.user:  # who we are, from the passwd entry: $USER may be stale (sudo -E, ...)
            self.user = entry.pw_name if entry else self.environ.get("USER") or str(self.uid)
        if not self.home:
            self.home = self.environ.get("HOME") or (entry.pw_dir if entry else "/")

    @property
    def system_conf_dir(self):
        return self.environ.get("PCOCC_SYSTEM_CONF_DIR", "/etc/pcocc")

    @property
    def user_conf_dir(self):
        return self.environ.get("PCOCC_USER_CONF_DIR", os.path.join(self.home, ".pcocc"))

    @property
    def cache_dir(self):
        base = self.environ.get("XDG_CACHE_HOME") or os.path.join(self.home, ".cache")
        return self.environ.get("PCOCC_CACHE_DIR", os.path.join(base, "pcocc"))

    @property
    def run_dir(self):
        """Runtime files of this user's VMs (sockets, overlays): short paths, as unix sockets need.

        $PCOCC_RUN_DIR, else $XDG_RUNTIME_DIR/pcocc when XDG_RUNTIME_DIR is
        private (owned by us, mode 0700, not a link), else /tmp/pcocc-<uid>
        (~/.cache/pcocc/run-<host> when another user took that name: fsutil.default_run_dir).
        Created (mode 0700) and checked on first use (fsutil.private_dir):
        another user's directory or a link there raises PermissionDenied.
        """
        if self._run_dir is None:
            from pcocc.fsutil import default_run_dir, private_dir

            self._run_dir = private_dir(default_run_dir(self.environ, self.uid))
        return self._run_dir

    def stderr_is_tty(self):
        return hasattr(self.stderr, "isatty") and self.stderr.isatty()
