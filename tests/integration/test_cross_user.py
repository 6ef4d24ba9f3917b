"""Two unprivileged users on one host (issue 12, section 4), with the local backend and real VMs:
the host's capacity holds across users, a user's files and paths are his own, and one user
cannot reach or disturb another's clusters.

Needs root (it creates two throwaway users, removed at the end).
"""

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

    def pcocc(self, *argv, run_dir=True, timeout=600):
        env = {"PATH": f"{PCOCC.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.home), "USER": self.name,
               "PCOCC_SYSTEM_CONF_DIR": str(self.etc)}
        if run_dir:  # else the default: $XDG_RUNTIME_DIR (unset here) or /tmp/pcocc-<uid>
            env["PCOCC_RUN_DIR"] = str(self.home / "run")
        return subprocess.run(["runuser", "-u", self.name, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                               str(PCOCC), *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=self.home)

    def ps(self):
        r = self.pcocc("ps", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def remove(self):
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
        users = [User(f"pcxa{suffix}", top, etc), User(f"pcxb{suffix}", top, etc)]
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
