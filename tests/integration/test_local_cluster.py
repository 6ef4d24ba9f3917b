"""Virtual clusters on the local backend, with real qemu (TCG here), the real guest agent
and the mutual-TLS control endpoint."""

import json
import os
import signal
import subprocess
import time

import pytest
from waiting import wait_for

from local_site import PCOCC, LocalSite
from pcocc.errors import ExitStatus

pytestmark = pytest.mark.integration


def ps(site):
    r = site.pcocc("ps", "--json", check=True)
    return json.loads(r.stdout)




def our_qemu_pids(site):
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"qemu-system" in cmd and str(site.run_dir).encode() in cmd:
                pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_image):
    """A 3-VM cluster with a 9p share, shared by the tests of this module."""
    site = LocalSite(tmp_path_factory.mktemp("cluster"), tiny_image)
    share = site.root / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the host\n")
    site.write(".pcocc/templates.yaml", f"""
tiny:
  image: user:tiny
  description: tiny test VM
  mount-points:
    share:
      path: {share}
      readonly: true
  user-data: {site.home}/ud.yaml
""")
    site.write("ud.yaml", "#cloud-config\nmounts:\n  - [share, /mnt/share, 9p, 'trans=virtio,version=9p2000.L,ro']\n")
    (site.home / ".ssh").mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(site.home / ".ssh/id_ed25519")], check=True)
    r = site.pcocc("batch", "-m", "256", "-J", "three", "--wait", "tiny:3")
    assert r.returncode == 0, r.stderr
    site.jobid = int(r.stdout.strip())
    yield site
    site.cleanup()


def test_every_vm_runs_and_its_agent_answers(cluster):
    (job,) = ps(cluster)
    assert job["jobid"] == cluster.jobid and job["name"] == "three"
    assert job["vm_states"] == {"vm0": "running", "vm1": "running", "vm2": "running"}
    r = cluster.pcocc("exec", "hostname")
    assert r.returncode == 0, r.stderr
    for n in range(3):  # lines as they come, each prefixed with its VM
        assert f"vm{n}: vm{n}" in r.stdout.splitlines()


def test_exec_gathers_output_and_exit_codes(cluster):
    r = cluster.pcocc("exec", "-b", "echo same")
    assert r.returncode == 0
    assert "vm[0-2] (3)" in r.stdout and r.stdout.count("same") == 1  # -b: grouped like clush -b
    r = cluster.pcocc("exec", "-w", "vm[1-2]", "exit 3")
    assert r.returncode == 3 and r.stdout == ""
    assert sorted(r.stderr.splitlines()) == ["vm1: exited with status 3", "vm2: exited with status 3"]
    r = cluster.pcocc("exec", "-w", "vm0", "cat /nonexistent")
    assert r.returncode == 1 and "No such file" in r.stderr  # one VM: its stderr is ours
    r = cluster.pcocc("exec", "-w", "vm2", "-u", "nobody", "id -un")
    assert r.returncode == 0 and r.stdout.strip() == "nobody"
    r = cluster.pcocc("exec", "-w", "vm7", "true")
    assert r.returncode == ExitStatus.USAGE and "no VM vm7" in r.stderr


def test_seed_gives_hostname_and_the_users_ssh_key(cluster):
    key = (cluster.home / ".ssh/id_ed25519.pub").read_text().strip()
    r = cluster.pcocc("exec", "-w", "vm2", "cat /root/.ssh/authorized_keys")
    assert r.returncode == 0 and key in r.stdout


def test_9p_mount_is_visible_in_the_guest(cluster):
    r = cluster.pcocc("exec", "-w", "vm1", "cat /mnt/share/hello.txt")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "hello from the host"


def test_console_log_and_monitor(cluster):
    r = cluster.pcocc("console", "-l", "vm0")
    assert r.returncode == 0 and "PCOCC-READY vm0" in r.stdout
    r = cluster.pcocc("monitor-cmd", "-w", "vm0", "info", "status")
    assert r.returncode == 0 and "running" in r.stdout
    r = cluster.pcocc("monitor-cmd", "vm1", "info", "name")  # the original's form: the VM first
    assert r.returncode == 0 and r.stdout.strip() == "vm1", r.stdout + r.stderr
    r = cluster.pcocc("monitor-cmd", "-w", "vm0", "vm1", "info", "name")
    assert r.returncode == 2 and "two VM lists" in r.stderr


def test_console_attach_on_the_vm_s_host(cluster):
    """pcocc console on the VM's own host: keystrokes reach the guest's serial shell, Ctrl-] detaches."""
    import select

    proc = subprocess.Popen([str(PCOCC), "console", "vm0"], env=cluster.environ, cwd=cluster.root,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, deadline = b"", time.monotonic() + 300
        while b"mark-42" not in out and time.monotonic() < deadline:
            proc.stdin.write(b"echo mark-$((6*7))\n")  # the tiny image's root shell on its serial console
            proc.stdin.flush()
            while select.select([proc.stdout], [], [], 2.0)[0] and b"mark-42" not in out:
                out += os.read(proc.stdout.fileno(), 4096)
        assert b"mark-42" in out, out[-2000:]
        proc.stdin.write(b"\x1d")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0 and b"detached" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_dump_and_reset(cluster):
    dump = cluster.root / "vm0.core"
    r = cluster.pcocc("dump", "vm0", dump)
    assert r.returncode == 0, r.stderr
    assert dump.read_bytes()[:4] == b"\x7fELF" and dump.stat().st_size > 200 * 2**20
    dump.unlink()
    assert cluster.pcocc("exec", "-w", "vm1", "touch /run/before-reset").returncode == 0  # /run is a tmpfs
    # paused first, so that its agent cannot answer before ps looks: the reset's record is published
    # before reset returns, and says booting until the agent answers again
    assert cluster.pcocc("monitor-cmd", "vm1", "stop").returncode == 0
    r = cluster.pcocc("reset", "vm1")
    assert r.returncode == 0, r.stderr

    def vm1():
        r = cluster.pcocc("ps", "--vms", "--json", check=True)
        return next(v for v in json.loads(r.stdout) if v["vm"] == "vm1")

    assert vm1()["state"] == "booting"
    # a guest stuck in its boot can be reset again, and its monitor reached
    r = cluster.pcocc("reset", "vm1")
    assert r.returncode == 0, r.stderr
    r = cluster.pcocc("monitor-cmd", "vm1", "cont")
    assert r.returncode == 0, r.stderr

    def rebooted():  # the guest reboots, and its agent comes back
        r = cluster.pcocc("exec", "-t", "5", "-w", "vm1", "test ! -e /run/before-reset && echo rebooted")
        return r.returncode == 0 and "rebooted" in r.stdout

    wait_for(rebooted, timeout=120, what="vm1 to reboot")
    assert vm1()["state"] == "running" and vm1()["agent"] == "ready"


def test_control_endpoint_refuses_other_users(cluster):
    from pcocc.agent import pki
    from pcocc.agent.endpoint import AgentError, ControlClient

    items = cluster.store_items()
    prefix = f"/pcocc/users/{cluster.environ['USER']}/clusters/{cluster.jobid}/"
    ca = json.loads(items[prefix + "ca"])
    vm0 = json.loads(items[prefix + "vms/0"])
    address = tuple(vm0["control"])
    # the owner's credential works; nobody can mint another one: the CA key is not kept
    client = json.loads(items[prefix + "client"])
    with ControlClient(address, ca_pem=client["ca"], cert_pem=client["cert"], key_pem=client["key"], timeout=10) as c:
        assert c.call("ping") == {"pong": True}
    assert "key" not in ca
    # (a certificate of the cluster's CA for another user is refused: tests/unit/test_endpoint.py)
    # a user with a certificate of another CA
    other_ca, other_key = pki.make_ca("elsewhere")
    cert, key = pki.issue(other_ca, other_key, cluster.environ["USER"])
    with pytest.raises(AgentError):
        with ControlClient(address, ca_pem=ca["cert"], cert_pem=cert, key_pem=key, timeout=10) as c:
            c.call("ping")


def test_crashed_vm_is_reported_and_cleaned(cluster):
    """Last test of the module: kills vm2's qemu, then cancels the cluster."""
    items = cluster.store_items()
    prefix = f"/pcocc/users/{cluster.environ['USER']}/clusters/{cluster.jobid}/"
    qemu_pid = json.loads(items[prefix + "vms/2"])["qemu_pid"]
    os.kill(qemu_pid, signal.SIGKILL)
    job = wait_for(lambda: next((j for j in ps(cluster) if j["vm_states"]["vm2"] == "failed"), None), what="vm2 reported failed")
    assert "killed by signal 9" in job["errors"]["vm2"]
    r = cluster.pcocc("exec", "-w", "vm0", "echo still here")
    assert r.returncode == 0 and "still here" in r.stdout
    r = cluster.pcocc("exec", "-w", "vm2", "true")
    assert r.returncode != 0 and "vm2 is not running" in r.stderr
    r = cluster.pcocc("cancel", "-J", "three")
    assert r.returncode == 0, r.stderr
    assert ps(cluster) == []
    assert our_qemu_pids(cluster) == []
    assert not (cluster.run_dir / f"job_{cluster.jobid}").exists()
    assert [k for k in cluster.store_items() if "/clusters/" in k or "/reservations/" in k] == [] or all(
        json.loads(v) in (None, {}) for k, v in cluster.store_items().items() if "/reservations/" in k
    )
    assert not [k for k in cluster.store_items() if "/clusters/" in k]


def test_batch_script_runs_in_vm0_and_ends_the_cluster(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    script = site.root / "job.sh"
    script.write_text("#!/bin/sh\necho \"script on $(hostname)\"\nexit 0\n")
    r = site.pcocc("batch", "-m", "256", "-b", script, "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.strip())  # the job id alone, like sbatch --parsable
    wait_for(lambda: ps(site) == [], timeout=120, what="the batch cluster to end")
    out = site.root / f"pcocc_{jobid}.out"
    lines = out.read_text().splitlines()  # the script's output, then how the cluster ended
    assert lines[0] == "script on vm0", lines
    assert lines[-1] == f"pcocc: cluster {jobid} ended: COMPLETED (the batch script exited with status 0)", lines
    assert our_qemu_pids(site) == []


def test_alloc_runs_a_host_script_inside_the_allocation(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    script = site.root / "alloc.sh"
    script.write_text("#!/bin/sh\nset -e\necho \"job=$PCOCC_JOB_ID\"\npcocc exec hostname\n")
    script.chmod(0o755)
    r = site.pcocc("alloc", "-m", "256", "-E", script, "tiny:1")
    assert r.returncode == 0, r.stderr
    assert "job=1" in r.stdout and "vm0" in r.stdout
    assert ps(site) == [] and our_qemu_pids(site) == []


def test_clusters_that_do_not_fit_are_refused(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    r = site.pcocc("batch", "-m", "16", "tiny:500")
    assert r.returncode == ExitStatus.RESOURCES
    assert "not enough cores on this host" in r.stderr
    r = site.pcocc("batch", "-m", "1000000", "tiny:1")
    assert r.returncode == ExitStatus.RESOURCES and "not enough memory" in r.stderr
    assert ps(site) == []
