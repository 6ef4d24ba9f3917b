"""A user's world for the local backend, for integration tests."""

import os
import signal
from pathlib import Path


def as_a_foreground_job():
    """preexec_fn of a pcocc started to get Ctrl-C (SIGINT): at its default and unblocked, as for a
    terminal's foreground job, whatever the test process has (a child inherits an ignored or a
    blocked SIGINT: signal(7)). The cause seen, pytest started as a background job, is undone
    for every test by tests/conftest.py:pytest_configure; this keeps the Ctrl-C tests exact
    should a test leave SIGINT blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def cache_dir():
    """pcocc's cache, shared by the tests, the demo and users: $PCOCC_TEST_CACHE or ~/.cache/pcocc."""
    return Path(os.environ.get("PCOCC_TEST_CACHE") or Path.home() / ".cache" / "pcocc")


def image_cache_dir():
    return cache_dir() / "images"


PCOCC = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "pcocc"


class LocalSite:
    """A user's world for the local backend: home, config, image repository, and `pcocc` run as a command."""

    def __init__(self, root, image, name="tiny"):
        import shutil
        import subprocess

        self.root = Path(root)
        self.home = self.root / "home"
        (self.home / ".pcocc").mkdir(parents=True)
        self.repo = self.root / "repo"
        self.environ = {
            "PATH": f"{PCOCC.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.home),
            "USER": os.environ.get("USER") or "root",
            "PCOCC_SYSTEM_CONF_DIR": str(self.root / "etc"),
            "PCOCC_CACHE_DIR": str(cache_dir()),
            "PCOCC_RUN_DIR": f"/tmp/pcocc-t{os.getpid()}-{abs(hash(str(root))) % 10**6}",
        }
        self.write(".pcocc/repos.yaml", f"repos:\n  - name: user\n    path: {self.repo}\n")
        # Each site plays a host of its own: its clusters' reservations of cores and memory are
        # counted apart from those of the tests that run beside it (they share /dev/shm otherwise).
        self.reservations = self.root / "reservations"
        self.reservations.mkdir()
        self.reservations.chmod(0o1777)
        (self.root / "etc").mkdir()
        (self.root / "etc" / "batch.yaml").write_text(f"type: local\nsettings:\n  reservation-dir: {self.reservations}\n")
        self.run_dir = Path(self.environ["PCOCC_RUN_DIR"])
        # the built image goes in as `image build` would put it
        from pcocc.config.models import Repo
        from pcocc.images.store import ImageStore

        store = ImageStore([Repo("user", str(self.repo), "user")], self.environ["USER"])
        boot = {"kernel": str(image.vmlinux or image.kernel), "initrd": str(image.initrd), "append": image.append}
        store.import_(str(image.disk), name, "qcow2", boot=boot)
        self._shutil, self._subprocess = shutil, subprocess

    def write(self, rel, text):
        path = self.home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def pcocc(self, *argv, check=False, timeout=600, cwd=None):
        proc = self._subprocess.run([str(PCOCC), *map(str, argv)], env=self.environ, capture_output=True, text=True, timeout=timeout, cwd=cwd or self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"pcocc {' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def per_vm(self, jobid, cmd, n):
        """{vmN: stdout} of a shell command run in each of the cluster's first n VMs."""
        out = {}
        for rank in range(n):
            r = self.pcocc("exec", "-j", jobid, "-w", f"vm{rank}", cmd)
            assert r.returncode == 0, r.stderr
            out[f"vm{rank}"] = r.stdout
        return out

    def store_items(self):
        import sqlite3

        db = self.home / ".pcocc" / "state.db"
        if not db.exists():
            return {}
        try:
            with sqlite3.connect(db) as conn:
                return dict(conn.execute("SELECT key, value FROM kv"))
        except sqlite3.OperationalError:  # being created by a command that runs now
            return {}

    def cleanup(self):
        """Cancel whatever is left (a failed test must not leave VMs running)."""
        import json

        ps = self.pcocc("ps", "--json")
        if ps.returncode == 0:
            for job in json.loads(ps.stdout):
                self.pcocc("cancel", "-j", job["jobid"])
        self._shutil.rmtree(self.run_dir, ignore_errors=True)
