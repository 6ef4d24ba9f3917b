"""slurmctld on the host and one slurmd per node netns, with the pcocc SPANK plugin."""

import os
import socket
import subprocess
import time
from pathlib import Path

from pcocc.errors import TimeoutExpired
from pcocc.testcluster import munge, ovs, pcoccconf, proc

CONFIG = """\
ClusterName=tc{id}
SlurmctldHost={host}({host_ip})
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock}
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool/%n
SlurmctldPidFile={s}/run/slurmctld.pid
SlurmdPidFile={s}/run/slurmd-%n.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd-%n.log
PlugStackConfig={s}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=250
SchedulerType=sched/backfill
# start batch jobs at the next scheduler pass (~1 s), not up to 3 s later
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# nodes claim more CPUs and memory than this host has
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
# The end of a job, as a site running pcocc sets it (slurm.conf(5); docs/admin.md):
# a round trip may take long on a loaded node (default 10)
MessageTimeout=20
# SIGTERM to SIGKILL: a VM task stops its VM (ACPI powerdown up to 30 s, then quit up to 5 s)
# and removes its files (default 30)
KillWait=45
# killed processes (qemu freeing its memory) may take a while to go before the node is drained (default 60)
UnkillableStepTimeout=120
# the plugin's node teardown runs in the job epilog, bounded by its teardown_timeout (120 s):
# the epilog's bound must exceed it, or slurmd kills it and drains the node (default: none)
PrologEpilogTimeout=180
# microseconds slurmctld needs per epilog completion message (the default)
EpilogMsgTime=2000
MinJobAge=5
NodeName=DEFAULT CPUs=4 RealMemory=4000 State=UNKNOWN
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


# the plugin's bounds of `setup create` and `setup delete` (seconds); PrologEpilogTimeout above exceeds the second
SETUP_TIMEOUT = 300
TEARDOWN_TIMEOUT = 120


def sdir(base):
    return Path(base) / "slurm"


def conf_path(base):
    return sdir(base) / "slurm.conf"


def write_config(base, layout, plugin=None, pcocc=None):
    s = sdir(base)
    for sub in ["state", "run", "log"] + [f"spool/{n}" for n in layout.node_names]:
        (s / sub).mkdir(parents=True, exist_ok=True)
    nodes = "\n".join(f"NodeName={n} NodeAddr={layout.node_ip(n)}" for n in layout.node_names)
    conf_path(base).write_text(CONFIG.format(
        id=layout.id, host=socket.gethostname().split(".")[0], host_ip=layout.host_ip,
        ctld_port=layout.slurmctld_port, munge_sock=munge.paths(base)[1], s=s, nodes=nodes,
    ))
    # slurmd reads this only when it starts; srun/salloc/sbatch on every call
    plugstack = f"required {plugin} pcocc={pcocc} timeout={SETUP_TIMEOUT} teardown_timeout={TEARDOWN_TIMEOUT}\n" if plugin else ""
    (s / "plugstack.conf").write_text(plugstack)


def daemon_env(base, layout, node=None, ovs_on=False):
    """The environment of the daemons, hence of the SPANK plugin's `pcocc` command."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "SLURM_CONF": str(conf_path(base)),
        "ETCDCTL_API": "3",
        "ETCDCTL_ENDPOINTS": f"http://{layout.host_ip}:{layout.etcd_port}",
        "PCOCC_TESTCLUSTER": str(base),
        "PCOCC_SYSTEM_CONF_DIR": str(pcoccconf.conf_dir(base)),
    }
    if node:
        env.update(node_env(base, layout, node, ovs_on))
    return env


def node_env(base, layout, node, ovs_on=False):
    """What differs from node to node: its OVS, its pcocc state dir, its VXLAN endpoint."""
    env = {"OVS_RUNDIR": str(ovs.rundir(base, node)), "PCOCC_NODE_STATE_DIR": str(pcoccconf.node_state_dir(base, node))}
    if ovs_on:
        # a harness detail: tunnels leave from the separate underlay (net.py), not from NodeAddr
        env["PCOCC_TUNNEL_IP"] = layout.tunnel_ip(node)
    return env


def start_controller(state, base, layout):
    return proc.spawn(
        state, "slurmctld", ["slurmctld", "-D", "-f", conf_path(base)],
        sdir(base) / "log" / "slurmctld.out", pidfile=sdir(base) / "run" / "slurmctld.pid",
        env=daemon_env(base, layout),
    )


def wait_controller(base, layout, process, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", layout.slurmctld_port)) == 0:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise TimeoutExpired(f"slurmctld is not listening: {proc.tail(sdir(base) / 'log' / 'slurmctld.log')}")
        time.sleep(0.01)


def start_node(state, base, layout, node, ovs_on=False):
    # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, and slurmd dies;
    # unshare --uts gives the node its own hostname
    argv = ["nsenter", f"--net=/run/netns/{layout.netns(node)}", "unshare", "--uts",
            "sh", "-c", 'hostname "$0" && exec slurmd -D -f "$1" -N "$0"', node, str(conf_path(base))]
    return proc.spawn(
        state, f"slurmd:{node}", argv, sdir(base) / "log" / f"slurmd-{node}.out",
        pidfile=sdir(base) / "run" / f"slurmd-{node}.pid", env=daemon_env(base, layout, node, ovs_on),
    )


def node_states(base, timeout=5):
    """{node: state} as sinfo sees it; {} if slurmctld does not answer."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], env=dict(os.environ, SLURM_CONF=str(conf_path(base))),
            capture_output=True, text=True, timeout=timeout,
        ).stdout
    except subprocess.TimeoutExpired:
        return {}
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)


def wait_idle(base, layout, processes, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        states = node_states(base)
        if all(states.get(n) == "idle" for n in layout.node_names):
            return
        for name, p in processes.items():
            if p.poll() is not None:
                log = sdir(base) / "log" / (f"{name.replace(':', '-')}.log")
                raise TimeoutExpired(f"{name} died: {proc.tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"nodes not idle after {timeout} s: {states}")
        time.sleep(0.05)


def job_ids(base, timeout=5):
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=dict(os.environ, SLURM_CONF=str(conf_path(base))),
            capture_output=True, text=True, timeout=timeout,
        ).stdout
    except subprocess.TimeoutExpired:
        return []
    return out.split()


def cancel_all(base, timeout=60):
    """Cancel every job and wait a while (at most timeout s), so that the jobs' epilogs
    (the plugin's `setup delete`) run; down() runs `setup cleanup` on the nodes after."""
    ids = job_ids(base)
    if not ids:
        return
    env = dict(os.environ, SLURM_CONF=str(conf_path(base)))
    subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while job_ids(base) and time.monotonic() < deadline:
        time.sleep(0.1)
