"""Two unprivileged users on one host (issue 12, section 4), with the local backend and real VMs:
the host's capacity holds across users, a user's files and paths are his own, and one user
cannot reach or disturb another's clusters.

Needs root (it creates two throwaway users, removed at the end).
"""

import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from waiting import wait_for

from local_site import PCOCC
from pcocc.errors import ExitStatus
from flood import flooding

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")]


class User:
    """A throwaway local user with a home under the test's directory, running pcocc as himself."""

    def __init__(self, name, top, etc):
        subprocess.run(["useradd", "-M", "-d", str(top / f"home-{name}"), "-s", "/bin/sh", name], check=True)
        self.name = name
        self.uid = pwd.getpwnam(name).pw_uid
        self.home = top / f"home-{name}"
        (self.home / ".pcocc").mkdir(parents=True)
        (self.home / ".pcocc" / "templates.yaml").write_text("tiny:\n  image: sys:tiny\n")
        subprocess.run(["chown", "-R", f"{name}:", str(self.home)], check=True)
        self.home.chmod(0o755)
        self.etc = etc

    def pcocc(self, *argv, run_dir=True, timeout=600, cwd=None, extra_env=()):
        env = {"PATH": f"{PCOCC.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.home), "USER": self.name,
               "PCOCC_SYSTEM_CONF_DIR": str(self.etc), **dict(extra_env)}
        if run_dir:  # else the default: $XDG_RUNTIME_DIR (unset here) or /tmp/pcocc-<uid>
            env["PCOCC_RUN_DIR"] = str(self.home / "run")
        return subprocess.run(["runuser", "-u", self.name, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                               str(PCOCC), *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or self.home)

    def run(self, *argv, **kw):
        """argv as this user (no pcocc)."""
        return subprocess.run(["runuser", "-u", self.name, "--", *map(str, argv)], capture_output=True, text=True, **kw)

    def own(self, path, text):
        """A file of this user's, written with text."""
        path.write_text(text)
        os.chown(path, self.uid, -1)
        return path

    def add_repo(self, name="mine"):
        """A repository of his own, in his default place (~/.pcocc/repo), which pcocc makes."""
        self.own(self.home / ".pcocc" / "repos.yaml", f"repos:\n  - name: {name}\n    path: '%{{homedir}}/.pcocc/repo'\n")
        return name

    def ps(self):
        r = self.pcocc("ps", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def remove(self):
        with contextlib.suppress(Exception):  # a failed pcocc must not keep the user and his files
            for job in self.ps():
                self.pcocc("cancel", "-j", job["jobid"])
        shutil.rmtree(f"/tmp/pcocc-{self.uid}", ignore_errors=True)  # its default private dir (the KVM probe's cache)
        subprocess.run(["userdel", self.name], capture_output=True)


@pytest.fixture
def two_users(tiny_image):
    top = Path(tempfile.mkdtemp(prefix="pcocc-xuser-", dir="/tmp"))
    top.chmod(0o755)
    etc = top / "etc"
    etc.mkdir()
    resv = top / "shm"  # the host's shared directory for reservations (as /dev/shm: sticky, world-writable)
    resv.mkdir()
    resv.chmod(0o1777)
    (etc / "batch.yaml").write_text(f"type: local\nsettings:\n  reservation-dir: {resv}\n")
    (etc / "repos.yaml").write_text(f"repos:\n  - name: sys\n    path: {top / 'sysrepo'}\n")
    from pcocc.config.models import Repo
    from pcocc.images.store import ImageStore

    boot = {"kernel": str(tiny_image.vmlinux or tiny_image.kernel), "initrd": str(tiny_image.initrd), "append": tiny_image.append}
    ImageStore([Repo("sys", str(top / "sysrepo"), "system")], "root").import_(str(tiny_image.disk), "tiny", "qcow2", boot=boot)
    subprocess.run(["chmod", "-R", "a+rX", str(etc), str(top / "sysrepo")], check=True)
    suffix = os.getpid() % 100000
    users = []
    try:
        for name in (f"pcxa{suffix}", f"pcxb{suffix}"):  # one at a time: the first is removed if the second fails
            users.append(User(name, top, etc))
        if subprocess.run(["runuser", "-u", users[0].name, "--", str(PCOCC), "--version"], capture_output=True).returncode:
            pytest.skip(f"other users cannot run {PCOCC} (a checkout under a private directory, such as /root)")
        yield users
    finally:
        for u in users:
            u.remove()
        shutil.rmtree(top, ignore_errors=True)


def test_the_host_s_capacity_holds_across_users(two_users):
    """r10: each user's reservations count for the other: together they cannot take more memory
    than the host has, while each alone could."""
    a, b = two_users
    with open("/proc/meminfo") as f:
        cap = int(next(int(l.split()[1]) for l in f if l.startswith("MemTotal:")) / 1024 * 0.9)
    m = cap * 6 // 10
    r = a.pcocc("batch", "-m", m, "tiny:1")
    assert r.returncode == 0, r.stderr
    r = b.pcocc("batch", "-m", m, "tiny:1")
    assert r.returncode == ExitStatus.RESOURCES, r.stderr
    assert "not enough memory on this host" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert b.ps() == []
    assert a.pcocc("cancel").returncode == 0
    wait_for(lambda: not [f for f in os.listdir(a.etc.parent / "shm") if "json" in f and _held(a.etc.parent / "shm" / f)],
             what="A's reservation to be released")
    r = b.pcocc("batch", "-m", m, "tiny:1")  # the memory is B's to take now
    assert r.returncode == 0, r.stderr
    assert b.pcocc("cancel").returncode == 0


def _held(path):
    try:
        return json.loads(path.read_text()) != {}
    except (OSError, ValueError):
        return False


def test_another_user_s_directory_at_my_run_dir_is_not_used_and_does_not_lock_me_out(two_users):
    """B made /tmp/pcocc-<A's uid> first: A's pcocc writes nothing there and runs all the same,
    from ~/.cache/pcocc/run-<host> (it used to refuse: B could lock A out of pcocc for good)."""
    a, b = two_users
    squat = Path(f"/tmp/pcocc-{a.uid}")
    assert not (squat.exists() or squat.is_symlink()), f"{squat} exists already on this host"
    subprocess.run(["runuser", "-u", b.name, "--", "mkdir", "-m", "0777", str(squat)], check=True)
    try:
        r = a.pcocc("batch", "-m", "256", "--wait", "tiny:1", run_dir=False)
        assert r.returncode == 0, r.stderr
        job = int(r.stdout)
        moved = a.home / ".cache" / "pcocc" / f"run-{socket.gethostname().split('.')[0]}"
        assert (moved / f"job_{job}").is_dir() and moved.stat().st_uid == a.uid
        assert stat.S_IMODE(moved.stat().st_mode) == 0o700
        assert os.listdir(squat) == []
        assert a.pcocc("cancel", "-j", job, run_dir=False).returncode == 0
        assert a.ps() == []
    finally:
        shutil.rmtree(squat, ignore_errors=True)


def test_a_user_s_files_and_clusters_are_his_own(two_users):
    """A's ~/.pcocc (state, repository, credentials) is closed to B, who cannot see, cancel or
    reach A's cluster; A's cluster runs on."""
    a, b = two_users
    r = a.pcocc("batch", "-m", "256", "--wait", "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.strip())
    assert b.ps() == []
    r = b.pcocc("cancel", "-j", jobid)
    assert r.returncode == ExitStatus.NOT_FOUND
    # (A made ~/.pcocc himself, 0755 here: what pcocc puts in it is private all the same)
    r = subprocess.run(["runuser", "-u", b.name, "--", "ls", str(a.home / "run")], capture_output=True)
    assert r.returncode != 0, f"{b.name} can list A's run dir"
    for name in ("state.db", "state.db-wal"):
        path = a.home / ".pcocc" / name
        assert path.exists()
        r = subprocess.run(["runuser", "-u", b.name, "--", "cat", str(path)], capture_output=True)
        assert r.returncode != 0, f"{b.name} can read {path}"
    assert [j["vm_states"] for j in a.ps()] == [{"vm0": "running"}]
    r = a.pcocc("exec", "hostname")
    assert r.returncode == 0 and r.stdout.strip() == "vm0"


def test_links_another_user_plants_in_a_shared_directory_are_never_followed(two_users):
    """r05 (and r04) between two users: B fills a sticky directory that A submits from, and uses
    as $TMPDIR, with links to a file of A's: at the -b script's output names of A's first 300
    jobs, and at the name the KVM probe's cache had there before it moved to A's private run dir.
    A's file is intact, A's pcocc makes nothing there, and the cluster's history says why its
    output was not written."""
    a, b = two_users
    shared = a.etc.parent / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    notes = a.own(a.home / "notes.txt", "important data\n")
    script = a.own(a.home / "job.sh", "#!/bin/sh\necho output of the batch script\n")
    script.chmod(0o755)
    plant = ("import os, sys\nd, uid, target = sys.argv[1:4]\n"
             "for n in [f'pcocc-accel-{uid}.json'] + [f'pcocc_{j}.out' for j in range(1, 301)]:\n"
             "    os.symlink(target, os.path.join(d, n))\n")
    r = b.run("python3", "-c", plant, shared, a.uid, notes)
    assert r.returncode == 0, r.stderr
    planted = set(os.listdir(shared))
    r = a.pcocc("batch", "-m", "256", "-b", script, "tiny:1", cwd=shared, extra_env={"TMPDIR": str(shared)})
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout)
    wait_for(lambda: a.ps() == [], timeout=300, what="the batch cluster to end")
    r = a.pcocc("history", "-j", jobid, "--json")
    assert r.returncode == 0, r.stderr
    (ended,) = json.loads(r.stdout)
    assert ended["state"] == "FAILED" and "was not written" in ended["reason"] and "\n" not in ended["reason"], ended
    assert notes.read_text() == "important data\n"
    assert set(os.listdir(shared)) == planted  # A's pcocc made nothing there
    assert all(os.lstat(shared / n).st_uid == b.uid for n in planted)


def test_a_user_s_images_are_closed_to_another_user(two_users):
    """r03 between two users: A's first pcocc command imports a disk holding a secret into his
    own repository (default umask; A's ~/.pcocc is 0755 here): B can neither list nor read it."""
    a, b = two_users
    repo = a.add_repo()
    disk = a.home / "secret.img"
    a.own(disk, "SECRET-MARKER-" + a.name)
    os.truncate(disk, 1 << 20)
    r = a.pcocc("image", "import", disk, f"{repo}:private")
    assert r.returncode == 0, r.stderr
    disk.unlink()
    top = a.home / ".pcocc" / "repo"
    files = [p for p in top.rglob("*") if p.is_file()]
    assert any(b"SECRET-MARKER-" in p.read_bytes() for p in files)  # the secret is there (root reads it)
    r = b.run("ls", top)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    for path in files:
        r = b.run("cat", path)
        assert r.returncode != 0, f"{b.name} can read {path}"


def test_another_user_s_flood_of_my_vm_s_endpoint_does_not_lock_me_out(two_users):
    """r02 between two users on one host: B holds hundreds of connections to the control
    endpoint of A's VM (a local peer: refused by its uid); A's exec and save get through."""
    import sqlite3

    a, b = two_users
    repo = a.add_repo()
    r = a.pcocc("batch", "-m", "256", "--wait", "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.strip())
    with contextlib.closing(sqlite3.connect(f"file:{a.home / '.pcocc' / 'state.db'}?mode=ro", uri=True)) as db:
        (value,) = db.execute("select value from kv where key = ?", (f"/pcocc/users/{a.name}/clusters/{jobid}/vms/0",)).fetchone()
    host, port = json.loads(value)["control"]
    with flooding(b.name, host, port):
        r = a.pcocc("exec", "echo", "still mine")
        assert r.returncode == 0 and r.stdout == "still mine\n", r.stderr
        r = a.pcocc("save", "-j", jobid, "-d", f"{repo}:saved", "--json", "vm0")
        assert r.returncode == 0 and json.loads(r.stdout)["uri"].startswith(f"{repo}:saved"), r.stderr
    assert a.pcocc("cancel", "-j", jobid).returncode == 0
