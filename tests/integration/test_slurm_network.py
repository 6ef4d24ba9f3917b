"""Private L2 networks between the VMs of a job across nodes (Open vSwitch, userspace
datapath, VXLAN) on the real test cluster: reachability, TCP, isolation between jobs,
teardown, and recovery from a node setup killed half-way."""

from pathlib import Path

import pytest

import leftovers
from slurm_fixture import kill_setup_midway
from test_slurm_cluster import SlurmSite
from waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

# the VMs number themselves from their hostname (vmN): job A 10.77.0.1-4, job B 10.77.0.11-12
USER_DATA = "#cloud-config\nruncmd:\n  - h=$(hostname); r=${{h#vm}}; ip addr add 10.77.0.$((r+{first}))/24 dev eth0; ip link set eth0 up\n"
FAKE_JOB = 999999


@pytest.fixture(scope="module")
def site(testcluster, slurm_user, tiny_image):
    templates = ("tiny:\n  image: user:tiny\n"
                 "net:\n  inherits: tiny\n  resource-set: l2net\n  description: tiny VM on the private L2 network\n")
    files = {f"ud-{name}.yaml": USER_DATA.format(first=first) for name, first in (("a", 1), ("b", 11))}
    s = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "netrepo", templates, files)
    yield s
    s.cancel_all()


def submit(site, definition, user_data, *slurm_args):
    r = site.pcocc("batch", *slurm_args, "--mem-per-cpu=256", "--wait", "--user-data", site.home / user_data, definition)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def vm_exec(site, jobid, vm, *argv, timeout=60):
    return site.pcocc("exec", "-j", jobid, "-w", f"vm{vm}", *argv, timeout=timeout)


def wait_addresses(site, jobid, addresses):
    """Wait for runcmd (which first waits ~10 s for a DHCP lease that never comes here)."""
    for vm, addr in enumerate(addresses):
        wait_for(lambda: addr in vm_exec(site, jobid, vm, "ip", "addr", "show", "dev", "eth0").stdout,
                 timeout=90, what=f"vm{vm} of job {jobid} to have {addr}")


def ping(site, jobid, vm, addr):
    return vm_exec(site, jobid, vm, "ping", "-c1", "-W2", addr).returncode == 0


def wait_jobs_end(site, jobs, timeout=120):
    """Wait until SLURM forgets these jobs; say what the nodes logged if it does not."""
    jobs = {str(j) for j in jobs}
    try:
        wait_for(lambda: not [j for j in site.squeue() if j[0] in jobs], timeout=timeout, what=f"jobs {jobs} to end")
    except AssertionError:
        logs = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-15:])
                         for p in sorted((Path(site.tc.base) / "slurm" / "log").glob("slurmd-*.log")))
        raise AssertionError(f"jobs still there: {site.squeue()}\n{logs}") from None


def job_keys(site, jobid):
    return site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/")


def node_objects(site, jobid):
    return leftovers.node_objects(site, jobid, "pn")


def test_l2_network_across_nodes_isolated_per_job_and_removed_by_scancel(site):
    # one test, in this order: pytest-xdist does not keep a module's tests in file order
    job_a = submit(site, "net:4", "ud-a.yaml", "-J", "neta", "-N", "2", "--ntasks-per-node=2")
    wait_addresses(site, job_a, [f"10.77.0.{i}" for i in range(1, 5)])
    hosts = {v["rank"]: v["host"] for v in site.keys(f"/pcocc/users/{site.user}/clusters/{job_a}/vms/").values()}
    assert hosts[0] != hosts[3]  # vm0 and vm3 are on different nodes
    for i in range(2, 5):
        assert ping(site, job_a, 0, f"10.77.0.{i}"), f"vm0 cannot reach 10.77.0.{i}"
    # each VM has its own MAC, from the network's prefix and its rank
    r = vm_exec(site, job_a, 3, "cat", "/sys/class/net/eth0/address")
    assert r.stdout.strip() == "52:54:00:77:00:03"
    # TCP across nodes, full-size segments: the userspace datapath's checksum traps are avoided
    r = vm_exec(site, job_a, 3, "sh", "-c", "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/blob bs=1k count=2048 2>/dev/null"
                " && busybox httpd -p 8080 -h /tmp/www && md5sum < /tmp/www/blob")
    assert r.returncode == 0, r.stderr
    sent = r.stdout.split()[0]
    r = vm_exec(site, job_a, 0, "sh", "-c", "wget -q -O - http://10.77.0.4:8080/blob | md5sum")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == sent
    # each node published what it made: one VNI for the job, on every node
    nodes = site.keys(f"/pcocc/users/{site.user}/clusters/{job_a}/nodes/")
    assert {v["state"] for v in nodes.values()} == {"complete"}
    vni_a = {v["objects"]["priv"]["vni"] for v in nodes.values()}
    assert len(vni_a) == 1
    for v in nodes.values():
        print(f"node setup of job {job_a} (2 VMs per node): {v['timings']}")

    # a second job on the same nodes, in the same subnet: only the network keeps them apart
    job_b = submit(site, "net:2", "ud-b.yaml", "-J", "netb", "-N", "2", "--ntasks-per-node=1")
    wait_addresses(site, job_b, ["10.77.0.11", "10.77.0.12"])
    assert {v["host"] for v in site.keys(f"/pcocc/users/{site.user}/clusters/{job_b}/vms/").values()} == set(hosts.values())
    assert ping(site, job_b, 0, "10.77.0.12")  # job B's own network works
    for addr in ("10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.4"):
        assert not ping(site, job_b, 0, addr), f"job B reaches job A's {addr}"
    for addr in ("10.77.0.11", "10.77.0.12"):
        assert not ping(site, job_a, 0, addr), f"job A reaches job B's {addr}"
    vni_b = {v["objects"]["priv"]["vni"] for v in site.keys(f"/pcocc/users/{site.user}/clusters/{job_b}/nodes/").values()}
    assert vni_a.isdisjoint(vni_b)

    # scancel: nothing of either job is left on the nodes or in the store
    assert node_objects(site, job_a) and node_objects(site, job_b)  # the check sees a live job's objects
    site.tc.run(["scancel", str(job_a), str(job_b)], user=site.user, check=True)
    wait_jobs_end(site, [job_a, job_b])
    for job in (job_a, job_b):
        assert node_objects(site, job) == []
        assert job_keys(site, job) == {}
        assert not any(o.startswith(f"{job}:") for o in leftovers.pool_owners(site))


def test_a_killed_setup_leaves_nothing_once_the_next_job_is_set_up(site, tmp_path):
    tc, node = site.tc, "node1"
    # a cluster record for a job SLURM never ran, so that node setup has work to do
    store = site.store()
    prefix = f"/pcocc/users/{site.user}/clusters/{FAKE_JOB}/"
    store.put(prefix + "info", {"jobid": FAKE_JOB, "vms": [{"rank": 0, "settings": {"resource-set": "l2net"}}]})
    # an ovs-vsctl that hangs when adding a port: the setup is killed with its bridge and tap made
    kill_setup_midway(tc, node, FAKE_JOB, site.pw.pw_uid, "ovs-vsctl",
                      '#!/bin/sh\ncase " $* " in *" add-port "*) exec sleep 300;; esac\nexec /usr/bin/ovs-vsctl "$@"\n',
                      lambda: f"pnt{FAKE_JOB}_0" in tc.onnode(node, ["ip", "-o", "link"]).stdout, "the killed setup's tap", tmp_path)
    left = node_objects(site, FAKE_JOB)
    assert f"{node}: ovs pnb{FAKE_JOB}" in left and f"{node}: link pnt{FAKE_JOB}_0" in left and f"{node}: undo-{FAKE_JOB}.json" in left
    # the next job on that node finds it dead and undoes what its log names
    jobid = submit(site, "net:1", "ud-a.yaml", "-J", "next", "-w", node)
    assert node_objects(site, FAKE_JOB) == []
    assert node_objects(site, jobid)
    assert not any(o.startswith(f"{FAKE_JOB}:") for o in leftovers.pool_owners(site))  # its VNI was reclaimed
    site.tc.run(["scancel", str(jobid)], check=True)
    wait_jobs_end(site, [jobid])
    store.delete_prefix(prefix)
    store.close()
    assert node_objects(site, jobid) == []
    assert job_keys(site, jobid) == {} and job_keys(site, FAKE_JOB) == {}
