"""Virtual clusters as SLURM jobs on the real test cluster (slurmctld, slurmd per node
namespace, munge, etcd, the SPANK plugin), submitted by an unprivileged user."""

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest
from waiting import wait_for


pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

PCOCC = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "pcocc")


class SlurmSite:
    def __init__(self, tc, user, home):
        self.tc, self.user, self.home = tc, user, home
        self.pw = pwd.getpwnam(user)

    def pcocc(self, *argv, timeout=600):
        env = {"HOME": str(self.home), "USER": self.user, "PATH": f"{Path(PCOCC).parent}:/usr/bin:/bin:/usr/sbin:/sbin"}
        return self.tc.run([PCOCC, *map(str, argv)], user=self.user, env=env, timeout=timeout, cwd=self.home)

    def store(self):
        from pcocc.config.loader import load_config
        from pcocc.env import Environment
        from pcocc.store import open_store

        env = Environment(environ={**os.environ, **self.tc.env}, user="root", home="/root")
        return open_store(load_config(env), env)

    def keys(self, prefix):
        s = self.store()
        try:
            return s.range(prefix)
        finally:
            s.close()

    def squeue(self):
        r = self.tc.run(["squeue", "-h", "-o", "%i %u %T %j"])
        return [line.split() for line in r.stdout.splitlines()]

    @classmethod
    def with_image(cls, tc, user, image, repo_name, templates, files=None):
        """The user's world: templates, a repository (repo_name in their home) with the tiny
        image as user:tiny (each module imports its own), and other files of their home."""
        from pcocc.config.models import Repo
        from pcocc.images.store import ImageStore

        pw = pwd.getpwnam(user)
        home = Path(pw.pw_dir)
        (home / ".pcocc").mkdir(exist_ok=True)
        repo = home / repo_name
        (home / ".pcocc/repos.yaml").write_text(f"repos:\n  - name: user\n    path: {repo}\n")
        (home / ".pcocc/templates.yaml").write_text(templates)
        for name, text in (files or {}).items():
            (home / name).write_text(text)
        if not repo.exists():
            boot = {"kernel": str(image.vmlinux or image.kernel), "initrd": str(image.initrd), "append": image.append}
            ImageStore([Repo("user", str(repo), "user")], user).import_(str(image.disk), "tiny", "qcow2", boot=boot)
        subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(home)], check=True)
        return cls(tc, user, home)

    def cancel_all(self, timeout=120):
        """scancel the user's jobs and wait until SLURM forgets them."""
        mine = [jobid for jobid, user, *_ in self.squeue() if user == self.user]
        for jobid in mine:
            self.tc.run(["scancel", jobid])
        wait_for(lambda: not [j for j in self.squeue() if j[0] in mine], timeout=timeout, what=f"jobs {mine} to end")


@pytest.fixture(scope="module")
def site(testcluster, slurm_user, tiny_image):
    s = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "repo", "tiny:\n  image: user:tiny\n  description: tiny test VM\n")
    yield s
    s.cancel_all()




def qemu_processes(uid):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if b"qemu-system" in cmd and os.stat(f"/proc/{pid}").st_uid == uid:
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_four_vms_on_two_nodes_as_a_slurm_job(site):
    r = site.pcocc("batch", "-J", "vc4", "-N", "2", "--ntasks-per-node=2", "--mem-per-cpu=256", "--wait", "tiny:4")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.strip())
    assert [str(jobid), site.user, "RUNNING", "vc4"] in site.squeue()
    # the VMs run as the user, two on each node
    vms = {k: v for k, v in site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/vms/").items()}
    assert len(vms) == 4 and {v["state"] for v in vms.values()} == {"running"}
    assert sorted(v["host"] for v in vms.values()) == ["node1", "node1", "node2", "node2"]
    for v in vms.values():
        assert os.stat(f"/proc/{v['qemu_pid']}").st_uid == site.pw.pw_uid
    nodes = site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/nodes/")
    assert {k.rsplit("/", 1)[1]: v["state"] for k, v in nodes.items()} == {"node1": "complete", "node2": "complete"}
    # ps and exec reach every VM across nodes
    r = site.pcocc("ps", "--json")
    assert r.returncode == 0, r.stderr
    (job,) = json.loads(r.stdout)
    assert job["jobid"] == jobid and job["vm_states"] == {f"vm{i}": "running" for i in range(4)}
    r = site.pcocc("exec", "hostname")
    assert r.returncode == 0, r.stderr
    for i in range(4):
        assert f"vm{i}: vm{i}" in r.stdout.splitlines()
    # another user, with an etcd account of their own, can neither read this cluster's
    # records (its CA key, its owner's credential) nor reach its VMs without them
    from pcocc.errors import PermissionDenied
    from pcocc.store.etcd import EtcdStore
    from pcocc.store.etcdauth import ensure_user, user_password_path

    other = site.tc.add_user(f"pcoccb{site.tc.id}")
    admin = site.store()
    ensure_user(admin, other.pw_name)
    admin.close()
    password = Path(user_password_path(other.pw_dir)).read_text().strip()
    as_other = EtcdStore([site.tc.etcd_endpoint], user=other.pw_name, password=password)
    try:
        for key in ("client", "ca", "info"):
            with pytest.raises(PermissionDenied):
                as_other.get(f"/pcocc/users/{site.user}/clusters/{jobid}/{key}")
        with pytest.raises(PermissionDenied):
            as_other.put(f"/pcocc/users/{site.user}/clusters/{jobid}/info", {})
        as_other.put(f"/pcocc/users/{other.pw_name}/mine", 1)  # their own prefix is theirs
        assert as_other.get(f"/pcocc/users/{other.pw_name}/mine") == 1
        as_other.delete(f"/pcocc/users/{other.pw_name}/mine")
    finally:
        as_other.close()
    other_env = {"HOME": other.pw_dir, "USER": other.pw_name}
    r = site.tc.run([PCOCC, "exec", "-j", jobid, "hostname"], user=other.pw_name, env=other_env)
    assert r.returncode != 0 and "no virtual cluster with job id" in r.stderr
    r = site.tc.run([PCOCC, "ps", "-u", site.user, "--json"], user=other.pw_name, env=other_env)
    assert r.returncode == 0, r.stderr
    assert [(j["jobid"], j["name"], j["state"]) for j in json.loads(r.stdout)] == [(jobid, "vc4", "running")]
    # scancel ends everything, everywhere
    site.tc.run(["scancel", str(jobid)], user=site.user, check=True)
    wait_for(lambda: not site.squeue(), what="the job to end")
    wait_for(lambda: not qemu_processes(site.pw.pw_uid), timeout=30, what="qemu to stop")
    assert site.keys(f"/pcocc/users/{site.user}/clusters/") == {}
    assert not os.path.exists(f"/tmp/pcocc-{site.pw.pw_uid}/job_{jobid}")
    for node in site.tc.node_names:
        state_dir = Path(site.tc.base) / "nodes" / node / "pcocc"
        assert [p.name for p in state_dir.iterdir() if p.name != "setup.lock"] == []


def test_failed_node_setup_is_reported_and_the_job_ends(site):
    lock = Path(site.tc.base) / "nodes" / "node2" / "pcocc" / "setup.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()  # a broken node: its setup lock cannot be opened
    try:
        r = site.pcocc("batch", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "--wait", "tiny:2")
    finally:
        lock.rmdir()
    assert r.returncode != 0
    assert "node setup failed on node2" in r.stderr and "setup.lock" in r.stderr, r.stderr
    wait_for(lambda: not site.squeue(), what="the job to end")
    wait_for(lambda: not qemu_processes(site.pw.pw_uid), timeout=30, what="qemu to stop")
    assert site.keys(f"/pcocc/users/{site.user}/clusters/") == {}


def test_alloc_host_script_and_batch_script(site):
    script = site.home / "host.sh"
    script.write_text("#!/bin/sh\necho \"in job $PCOCC_JOB_ID on $(hostname)\"\npcocc exec -w vm1 hostname\n")
    script.chmod(0o755)
    subprocess.run(["chown", site.user, str(script)], check=True)
    r = site.pcocc("alloc", "-N", "1", "--mem-per-cpu=256", "-E", script, "tiny:2")
    assert r.returncode == 0, r.stderr
    assert "in job " in r.stdout and "vm1" in r.stdout
    # the original's phase messages, in order, on stderr (site scripts read them)
    assert 0 <= r.stderr.find("Configuring hosts...") < r.stderr.find("Terminating the cluster..."), r.stderr
    wait_for(lambda: not site.squeue(), what="the allocation to end")

    script = site.home / "job.sh"
    script.write_text("#!/bin/sh\necho \"batch script on $(hostname)\"\n")
    subprocess.run(["chown", site.user, str(script)], check=True)
    r = site.pcocc("batch", "-N", "1", "--mem-per-cpu=256", "-b", script, "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.strip())
    wait_for(lambda: not site.squeue(), what="the batch job to end")
    out = (site.home / f"pcocc_{jobid}.out").read_text()
    assert "batch script on vm0" in out, out
    assert f"pcocc: cluster {jobid} ended: COMPLETED (the batch script exited with status 0)" in out, out
    r = site.pcocc("history", "-j", jobid, "--json")  # and the history, with its start time
    (entry,) = json.loads(r.stdout)
    assert entry["state"] == "COMPLETED" and entry["started"] and entry["exit_code"] == 0, entry
    assert not qemu_processes(site.pw.pw_uid)
    assert site.keys(f"/pcocc/users/{site.user}/clusters/") == {}


def test_console_from_the_login_node(site):
    """pcocc console and console -l from a host other than the VM's (the original's rule): here the
    login node (the host's namespace), the VM on node1, through the VM's control endpoint."""
    import select
    import time

    r = site.pcocc("batch", "-N", "1", "-w", "node1", "--mem-per-cpu=256", "--wait", "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    try:
        wait_for(lambda: "PCOCC-READY vm0" in site.pcocc("console", "-l", "-j", jobid, "vm0").stdout,
                 timeout=300, what="the console log, read from the login node")
        env = {"HOME": str(site.home), "USER": site.user, "PATH": f"{Path(PCOCC).parent}:/usr/bin:/bin:/usr/sbin:/sbin"}
        proc = subprocess.Popen(["runuser", "-u", site.user, "--", PCOCC, "console", "-j", str(jobid), "vm0"],
                                env={**os.environ, **site.tc.env, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=site.home, start_new_session=True)
        try:
            out, deadline = b"", time.monotonic() + 300
            proc.stdin.write(b"echo mark-$((6*7))\n")  # the tiny image's root shell on its serial console
            proc.stdin.flush()
            while b"mark-42" not in out and time.monotonic() < deadline:
                if select.select([proc.stdout], [], [], 1.0)[0]:
                    out += os.read(proc.stdout.fileno(), 4096)
                if b"mark-42" not in out:
                    proc.stdin.write(b"\n")  # a prompt, should the first line have come before the shell read
                    proc.stdin.flush()
            assert b"mark-42" in out, out[-2000:]
            proc.stdin.write(b"\x1d")  # Ctrl-] detaches
            proc.stdin.flush()
            assert proc.wait(timeout=60) == 0
            assert b"detached" in proc.stderr.read()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    finally:
        site.tc.run(["scancel", str(jobid)], user=site.user)
        wait_for(lambda: not site.squeue(), what="the job to end")
