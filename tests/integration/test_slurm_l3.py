"""L3 private networks on the real test cluster (2 nodes, OVS userspace datapath, VXLAN):
DHCP addresses and hostnames, DNS and ping by name across nodes, `pcocc ssh` through the
reverse NAT from the host, outbound NAT to a server on the host, no packet between two
concurrent jobs (ARP, broadcast and unicast, both ways, watched on the taps), and
nothing left after scancel or after a SIGKILLed setup once the next job is set up."""

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import leftovers
from slurm_fixture import kill_setup_midway
from test_slurm_cluster import SlurmSite
from waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

FAKE_JOB = 999998
DOMAIN = "cluster.test"
# the user's account in the VMs, with the key cloud-init gave root (as a site's user-data would)
USER_DATA = ("#cloud-config\nruncmd:\n  - useradd -m -p '*' {user} && mkdir -p /home/{user}/.ssh"
             " && cp /root/.ssh/authorized_keys /home/{user}/.ssh/ && chown -R {user} /home/{user}/.ssh\n")


@pytest.fixture(scope="module")
def site(testcluster, slurm_user, tiny_image):
    templates = "tiny:\n  image: user:tiny\nl3:\n  inherits: tiny\n  resource-set: l3net\n  description: tiny VM on the L3 network\n"
    s = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "l3repo", templates, {"ud-l3.yaml": USER_DATA.format(user=slurm_user)})
    key = s.home / ".ssh/id_ed25519"
    if not key.exists():
        key.parent.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        subprocess.run(["chown", "-R", f"{s.pw.pw_uid}:{s.pw.pw_gid}", str(key.parent)], check=True)
    yield s
    s.cancel_all()


def submit(site, definition, *slurm_args):
    r = site.pcocc("batch", *slurm_args, "--mem-per-cpu=256", "--wait", "--user-data", site.home / "ud-l3.yaml", definition)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def vm_sh(site, jobid, vm, script, timeout=60):
    return site.pcocc("exec", "-j", jobid, "-w", f"vm{vm}", "sh", "-c", script, timeout=timeout)


def dhcp_env(site, jobid, vm):
    r = vm_sh(site, jobid, vm, "cat /run/pcocc/dhcp.env")
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line) if r.returncode == 0 else {}


def wait_jobs_end(site, jobs, timeout=120):
    jobs = {str(j) for j in jobs}
    wait_for(lambda: not [j for j in site.squeue() if j[0] in jobs], timeout=timeout, what=f"jobs {jobs} to end")


def vm_hosts(site, jobid):
    return {v["rank"]: v["host"] for v in site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/vms/").values()}


def node_records(site, jobid):
    return {k.rsplit("/", 1)[1]: v for k, v in site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/nodes/").items()}


def node_objects(site, jobid):
    return leftovers.node_objects(site, jobid, "pl")


def assert_gone(site, jobid):
    leftovers.assert_gone(site, jobid, "pl")


class Capture:
    """tcpdump on a node's tap, for the packets the isolation test sends."""

    FILTER = "arp host 10.78.0.77 or arp host 10.78.0.88 or dst host 10.78.0.255 or icmp[icmptype] == icmp-echo"

    def __init__(self, tc, node, tap):
        self.tap = tap
        self.proc = subprocess.Popen([*tc.enter_argv(node), "tcpdump", "-n", "-l", "-i", tap, self.FILTER],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        wait_for(lambda: any("listening on" in line for line in self.err) or self.proc.poll() is not None,
                 timeout=20, what=f"tcpdump on {tap}")
        assert self.proc.poll() is None, "".join(self.err)

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        out, _ = self.proc.communicate(timeout=20)
        return [line for line in out.splitlines() if line.strip()]


def capture_while(site, taps, send):
    """{tap: [packet lines]} seen on each tap while send() runs."""
    caps = [Capture(site.tc, node, tap) for node, tap in taps]
    try:
        send()
        time.sleep(2)
    finally:
        seen = {c.tap: c.stop() for c in caps}
    return seen


def taps(site, jobid):
    from pcocc.networks.names import dev_name

    return [(host, dev_name("pl", "t", jobid, rank)) for rank, host in sorted(vm_hosts(site, jobid).items())]


def test_l3_network_dhcp_dns_ssh_nat_isolation_and_teardown(site):
    tc = site.tc
    job_a = submit(site, "l3:4", "-J", "l3a", "-N", "2", "--ntasks-per-node=2")
    for vm in range(4):
        wait_for(lambda: dhcp_env(site, job_a, vm).get("ip"), timeout=120, what=f"vm{vm}'s DHCP lease")
        assert dhcp_env(site, job_a, vm) == {"ip": f"10.78.0.{vm + 1}", "router": "10.78.0.254", "dns": "10.78.0.254",
                                             "domain": DOMAIN, "hostname": f"vm{vm}"}
    hosts = vm_hosts(site, job_a)
    assert hosts[0] != hosts[3]
    # names: every VM resolves and pings every other, across nodes, qualified and short
    for vm, others in ((0, (1, 2, 3)), (3, (0, 1, 2))):
        script = "; ".join(f"ping -c1 -W3 vm{o}.{DOMAIN} && ping -c1 -W3 vm{o}" for o in others)
        r = vm_sh(site, job_a, vm, "set -e; " + script)
        assert r.returncode == 0, f"vm{vm}: {r.stdout}{r.stderr}"
    r = vm_sh(site, job_a, 0, f"nslookup vm3.{DOMAIN}")
    assert "10.78.0.4" in r.stdout, r.stdout

    # ssh from the host, as the user, with the key cloud-init gave the VM
    wait_for(lambda: vm_sh(site, job_a, 3, f"test -s /home/{site.user}/.ssh/authorized_keys").returncode == 0,
             timeout=60, what="vm3's account")
    r = site.pcocc("ssh", "-j", job_a, "vm3", "hostname", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "vm3", r.stderr

    # outbound NAT: a server on the host sees vm2's node as the source
    server = socket.create_server((tc.layout.host_ip, 0))
    peers = []

    def serve():
        with contextlib.suppress(OSError):
            conn, peer = server.accept()
            with conn:
                peers.append(peer[0])
                conn.sendall(b"hello from the host\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        r = vm_sh(site, job_a, 2, f"echo hi | nc {tc.layout.host_ip} {server.getsockname()[1]}")
    finally:
        server.close()
    assert "hello from the host" in r.stdout, r.stdout + r.stderr
    assert peers == [tc.node_ip(hosts[2])]

    # a second job on the same nodes, same addresses: not a single packet between the two
    job_b = submit(site, "l3:2", "-J", "l3b", "-N", "2", "--ntasks-per-node=1")
    for vm in range(2):
        wait_for(lambda: dhcp_env(site, job_b, vm).get("ip"), timeout=120, what=f"job B vm{vm}'s DHCP lease")
    ext = {job: [v["ext_ip"] for rec in node_records(site, job).values() for v in rec["objects"]["pub"]["vms"].values()]
           for job in (job_a, job_b)}

    def sender(job, target, other):
        script = (f"arping -c 2 -w 3 -I eth0 {target}; ping -b -c 2 -W 1 10.78.0.255;"
                  + "".join(f" ping -c 1 -W 1 {ip};" for ip in ext[other]) + " true")
        return lambda: vm_sh(site, job, 0, script, timeout=90)

    for src, dst, target in ((job_a, job_b, "10.78.0.77"), (job_b, job_a, "10.78.0.88")):
        seen = capture_while(site, taps(site, src) + taps(site, dst), sender(src, target, dst))
        own = [line for _, tap in taps(site, src) for line in seen[tap]]
        assert any(target in line for line in own), f"the check sees nothing of job {src}'s own traffic: {seen}"
        leaked = {tap: seen[tap] for _, tap in taps(site, dst) if seen[tap]}
        assert not leaked, f"job {src}'s packets reached job {dst}: {leaked}"

    # scancel: nothing of either job is left on the nodes, in the store or in the pools
    assert node_objects(site, job_a) and node_objects(site, job_b)
    tc.run(["scancel", str(job_a), str(job_b)], user=site.user, check=True)
    wait_jobs_end(site, [job_a, job_b])
    for job in (job_a, job_b):
        assert_gone(site, job)
        assert site.keys(f"/pcocc/users/{site.user}/clusters/{job}/") == {}
        assert not [o for o in leftovers.pool_owners(site) if o.startswith(f"{job}:")]


def test_a_killed_l3_setup_leaves_nothing_once_the_next_job_is_set_up(site, tmp_path):
    tc, node = site.tc, "node1"
    store = site.store()
    prefix = f"/pcocc/users/{site.user}/clusters/{FAKE_JOB}/"
    store.put(prefix + "info", {"jobid": FAKE_JOB, "vms": [{"rank": 0, "settings": {"resource-set": "l3net"}}]})
    # a dnsmasq that starts, then hangs: the setup is killed with everything made
    kill_setup_midway(tc, node, FAKE_JOB, site.pw.pw_uid, "dnsmasq", '#!/bin/sh\n/usr/sbin/dnsmasq "$@" && exec sleep 300\n',
                      lambda: leftovers.dnsmasq_pids(FAKE_JOB, [tc.node_state_dir(node)]), "the killed setup's dnsmasq", tmp_path)
    left = node_objects(site, FAKE_JOB)
    from pcocc.networks.gateway import netns_name

    for what in (f"netns {netns_name(FAKE_JOB, 'pub', node, tc.node_state_dir(node))}", f"{node}: link plg{FAKE_JOB}",
                 f"{node}: undo-{FAKE_JOB}.json"):
        assert what in left, left
    assert any(o.startswith("dnsmasq ") for o in left) and any(" nat " in o for o in left), left
    assert [o for o in leftovers.pool_owners(site) if o.startswith(f"{FAKE_JOB}:")]
    # the next job on that node finds it dead and undoes what its log names
    jobid = submit(site, "l3:1", "-J", "next", "-w", node)
    assert node_objects(site, FAKE_JOB) == []
    assert not [o for o in leftovers.pool_owners(site) if o.startswith(f"{FAKE_JOB}:")]
    assert node_objects(site, jobid)
    tc.run(["scancel", str(jobid)], check=True)
    wait_jobs_end(site, [jobid])
    store.delete_prefix(prefix)
    store.close()
    assert_gone(site, jobid)
    assert site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/") == {}


COUNTER = ("nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/cnt; sleep 0.2; done' "
           ">/dev/null 2>&1 </dev/null & echo $! > /run/cnt.pid")


def test_checkpoint_and_restart_under_slurm_with_the_l3_network(site):
    """A 2-node cluster on the L3 network is checkpointed, then restarted as a new job: the
    processes go on, and the network (new taps, new gateway, same addresses) works again."""
    job = submit(site, "l3:2", "-J", "ck", "-N", "2", "--ntasks-per-node=1")
    for vm in range(2):
        wait_for(lambda: dhcp_env(site, job, vm).get("ip"), timeout=120, what=f"vm{vm}'s DHCP lease")
        assert vm_sh(site, job, vm, COUNTER).returncode == 0
    before = {vm: vm_sh(site, job, vm, "sleep 1; cat /run/cnt.pid").stdout.strip() for vm in range(2)}
    ck = site.home / "ck-l3"
    r = site.pcocc("ckpt", "-j", job, ck, timeout=300)
    assert r.returncode == 0, r.stderr
    wait_jobs_end(site, [job])
    assert_gone(site, job)

    job2 = int(site.pcocc("batch", "-r", ck, "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "--wait",
                          "l3:2", timeout=300).stdout.strip() or 0)
    assert job2 and job2 != job
    try:
        for vm in range(2):
            r = vm_sh(site, job2, vm, "cat /run/cnt.pid; kill -0 $(cat /run/cnt.pid) && echo alive")
            assert r.stdout.split() == [before[vm], "alive"], r.stdout + r.stderr  # the very same process
        r = vm_sh(site, job2, 0, f"ping -c1 -W5 vm1.{DOMAIN}")
        assert r.returncode == 0, r.stdout + r.stderr
        r = site.pcocc("ssh", "-j", job2, "vm1", "cat /run/cnt", timeout=120)
        assert r.returncode == 0 and int(r.stdout) > 0, r.stderr
    finally:
        site.tc.run(["scancel", str(job2)], user=site.user)
        wait_jobs_end(site, [job2])
    assert_gone(site, job2)


def console_log(site, jobid, rank):
    """vmN's console log, read where its node keeps it (the same file system here)."""
    vm = site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/vms/{rank}")[f"/pcocc/users/{site.user}/clusters/{jobid}/vms/{rank}"]
    return (Path(vm["rundir"]) / "console.log").read_text(errors="replace")


def test_instant_cluster_under_slurm_on_the_l3_network(site):
    """A template snapshot taken as a SLURM job; a 2-node cluster of that template is restored from it
    (no boot), each VM with its own name, MAC and address; a VM of another size boots."""
    r = site.pcocc("template", "snapshot", "-c", "1", "-m", "256", "l3", timeout=600)
    assert r.returncode == 0, r.stderr
    try:
        job = int(site.pcocc("batch", "-N", "2", "--ntasks-per-node=1", "-c", "1", "--mem-per-cpu=256", "--wait", "l3:2",
                             timeout=600).stdout.strip() or 0)
        assert job
        for vm in range(2):
            want = f"10.78.0.{vm + 1}"
            wait_for(lambda: dhcp_env(site, job, vm).get("ip") == want, timeout=120, what=f"vm{vm}'s own lease ({want})")
            assert dhcp_env(site, job, vm)["hostname"] == f"vm{vm}"
            assert vm_sh(site, job, vm, "cat /sys/class/net/eth0/address").stdout.strip() == f"52:54:00:78:00:{vm:02x}"
            assert "PCOCC-READY" not in console_log(site, job, vm)  # restored: no boot of its own
        r = vm_sh(site, job, 0, f"ping -c1 -W5 vm1.{DOMAIN}")
        assert r.returncode == 0, r.stdout + r.stderr
        out = (site.home / f"pcocc_{job}.out").read_text() + (site.home / f"pcocc_{job}.err").read_text()
        assert "restoring the VMs of l3 from their template's snapshot" in out, out
        site.tc.run(["scancel", str(job)], user=site.user)
        wait_jobs_end(site, [job])
        # another size: the VMs boot
        job = int(site.pcocc("batch", "-c", "1", "--mem-per-cpu=300", "--wait", "l3:1", timeout=600).stdout.strip() or 0)
        assert job
        out = (site.home / f"pcocc_{job}.out").read_text() + (site.home / f"pcocc_{job}.err").read_text()
        assert "restoring" in out  # the launcher offered the snapshot; the VM's own slice decided
        wait_for(lambda: "PCOCC-READY" in console_log(site, job, 0), timeout=120, what="vm0 to boot")
    finally:
        site.cancel_all()
        site.pcocc("template", "snapshot", "--delete", "l3")
