"""What a job leaves on the test cluster's nodes: the checks of the network tests."""

import contextlib
import os
import re
from pathlib import Path


def pool_owners(site):
    """Every owner of an id in the store's pools (VXLAN ids, external IPs, host ports...)."""
    return [o for v in site.keys("/pcocc/global/pools/").values() for o in (v or {}).values()]


def node_objects(site, jobid, prefix):
    """What of the job exists on each node: OVS objects and devices named with the network's
    dev-prefix, iptables rules, namespaces, dnsmasq processes, undo logs and daemon files."""
    found = []
    names = re.compile(rf"\b{prefix}[btxgh]{jobid}(?:_\w+)?\b")
    for node in site.tc.node_names:
        show = site.tc.onnode(node, ["ovs-vsctl", "--timeout=5", "show"], check=True).stdout
        found += [f"{node}: ovs {m}" for m in names.findall(show)]
        links = site.tc.onnode(node, ["ip", "-o", "link"], check=True).stdout
        found += [f"{node}: link {m}" for m in names.findall(links)]
        state_dir = Path(site.tc.node_state_dir(node))
        idle = not list(state_dir.glob("undo-*"))  # no job set up on the node: nor the chain they share
        for table in ("filter", "nat"):
            rules = site.tc.onnode(node, ["iptables", "-w", "-t", table, "-S"], check=True).stdout
            found += [f"{node}: {table} {line}" for line in rules.splitlines()
                      if f'"pcocc job {jobid}"' in line or (idle and "PCOCC-FORWARD" in line)]
        found += [f"{node}: {p.name}" for p in state_dir.iterdir() if p.name.startswith((f"undo-{jobid}.", f"dnsmasq-{jobid}-"))]
    # host-wide: only this cluster's (its nodes' state dirs), never another test cluster's job of that number
    dirs = [site.tc.node_state_dir(node) for node in site.tc.node_names]
    found += [f"netns {n}" for n in os.listdir("/run/netns") if _of_cluster_job(n, jobid, site.tc.node_names, dirs)] \
        if os.path.isdir("/run/netns") else []
    found += [f"dnsmasq {pid}" for pid in dnsmasq_pids(jobid, dirs)]
    return found


def _of_cluster_job(netns, jobid, nodes, dirs):
    """Whether a gateway namespace is of job `jobid` on one of these nodes (gateway.netns_name)."""
    from pcocc.networks.gateway import netns_tag

    return any(netns.startswith(f"pcocc-{node}-{jobid}-") and netns.endswith(netns_tag(d)) for node, d in zip(nodes, dirs))


def dnsmasq_pids(jobid, state_dirs):
    """The dnsmasq processes of job `jobid` whose files are in one of these node state dirs."""
    out = []
    marks = [f"--conf-file={os.path.join(d, f'dnsmasq-{jobid}-')}".encode() for d in state_dirs]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmd[0].endswith(b"dnsmasq") and any(a.startswith(m) for a in cmd for m in marks):
                out.append(int(pid))
    return out


def assert_gone(site, jobid, prefix):
    """Nothing of the job on the nodes; else what is left, and what the nodes logged."""
    left = node_objects(site, jobid, prefix)
    if left:
        logs = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-20:])
                         for p in sorted((Path(site.tc.base) / "slurm" / "log").glob("slurmd-*.log")))
        raise AssertionError(f"job {jobid} left {left}\n{logs}")


def run_dir(site, jobid):
    """The job's VM run dir on the nodes (they share this host's /tmp), by the rule node setup records."""
    from pcocc.lifecycle.nodesetup import task_run_dir

    return task_run_dir({"HOME": str(site.home)}, site.pw.pw_uid, jobid)


def job_processes(jobid, uid=None):
    """pids of the job's VM processes (`pcocc internal run` and qemu), found by their run dir in /proc;
    with uid, only that user's (job ids of other test clusters and benches on this machine repeat)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if uid is not None and os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if cmd.split(b"\0")[0].endswith(b"srun") or " Z " in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]:
                continue  # the step's srun (it names `internal run` too), or a zombie
            if (b"qemu-system" in cmd and f"/job_{jobid}/".encode() in cmd) or (
                    b"internal\0run" in cmd and f"SLURM_JOB_ID={jobid}".encode() in env):
                out.append(int(pid))
    return out


def everything(site, jobid, prefix):
    """All a job may leave behind: node objects (node_objects), the plugin's markers, VM processes,
    the run dir, the cluster's keys and its pool entries in the store."""
    found = node_objects(site, jobid, prefix)
    for node in site.tc.node_names:
        found += [f"{node}: {p.name}" for p in Path(site.tc.node_state_dir(node)).glob(f"spank-{jobid}.vm")]
    found += [f"process {pid} ({_cmdline(pid)})" for pid in job_processes(jobid, site.pw.pw_uid)]
    if os.path.lexists(run_dir(site, jobid)):
        found.append(f"run dir {run_dir(site, jobid)}")
    found += [f"store {k}" for k in site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/")]
    found += [f"pool entry {o}" for o in pool_owners(site) if str(o).startswith(f"{jobid}:")]
    return found


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120].strip()
    except OSError:
        return "gone"
