"""The host slice a VM copies: its cores, their NUMA nodes, and vCPU pinning."""

import glob
import os
import re
from dataclasses import dataclass


def parse_cpulist(text):
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def format_cpulist(cpus):
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def host_numa_nodes(sysfs="/sys"):
    """{node id: [cpus]} from sysfs; one node with every CPU when sysfs has none."""
    nodes = {}
    for path in glob.glob(os.path.join(sysfs, "devices/system/node/node[0-9]*/cpulist")):
        node = int(re.search(r"node(\d+)/cpulist$", path).group(1))
        with open(path) as f:
            nodes[node] = parse_cpulist(f.read())
    return nodes or {0: sorted(os.sched_getaffinity(0))}


@dataclass(frozen=True)
class Topology:
    """What a VM gets: its host cores (one vCPU per core) and memory, split by NUMA node."""

    cores: tuple  # host CPU ids, in vCPU order
    memory_mb: int
    numa: tuple  # ((node id, (vcpu indexes...)), ...) in guest node order
    emulator_cores: tuple = ()  # host CPUs kept for qemu's own threads (template emulator-cores)

    @property
    def vcpus(self):
        return len(self.cores)


def expand_tasks_per_node(text):
    """SLURM's '2(x3),1' -> [2, 2, 2, 1] (tasks on each node of the step)."""
    out = []
    for part in text.split(","):
        count, _, times = part.partition("(x")
        out += [int(count)] * int(times.rstrip(")") or 1)
    return out


def task_slice(environ):
    """(cores, memory MiB) of the SLURM task we run in: its CPU affinity and its memory share."""
    cores = sorted(os.sched_getaffinity(0))
    cpus = int(environ.get("SLURM_CPUS_PER_TASK") or 1)
    if len(cores) > cpus:  # no task binding (TaskPlugin=task/none): take our share in task order
        local_id = int(environ.get("SLURM_LOCALID") or 0)
        start = (local_id * cpus) % len(cores)
        cores = (cores[start:] + cores[:start])[:cpus]
    if environ.get("SLURM_MEM_PER_CPU"):
        memory = int(environ["SLURM_MEM_PER_CPU"]) * cpus
    elif environ.get("SLURM_MEM_PER_NODE"):
        layout = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
        tasks = expand_tasks_per_node(layout)
        node = int(environ.get("SLURM_NODEID") or 0)
        memory = int(environ["SLURM_MEM_PER_NODE"]) // max(tasks[node] if node < len(tasks) else 1, 1)
    else:
        memory = 1024 * cpus
    return cores, memory


def plan(cores, memory_mb, sysfs="/sys", emulator_cores=0):
    """Topology for a VM given its cores: one guest NUMA node per host node spanned.

    emulator_cores of them (at most all but one) are kept for qemu's own threads.
    """
    cores = tuple(cores)
    keep = max(0, min(emulator_cores, len(cores) - 1))
    emulator = cores[len(cores) - keep:] if keep else ()
    cores = cores[: len(cores) - keep]
    host = host_numa_nodes(sysfs)
    by_node = {}
    for i, cpu in enumerate(cores):
        node = next((n for n, cpus in host.items() if cpu in cpus), 0)
        by_node.setdefault(node, []).append(i)
    numa = tuple((node, tuple(v)) for node, v in sorted(by_node.items()))
    return Topology(cores, memory_mb, numa, emulator)


def numa_args(topo, shared=False):
    """qemu arguments for the guest NUMA layout (none for a single node). shared: the memory
    is a memfd another process may map (share=on: virtio-fs's virtiofsd does)."""
    if len(topo.numa) < 2:
        return []
    args = []
    total_vcpus = topo.vcpus
    remaining = topo.memory_mb
    for i, (node, vcpus) in enumerate(topo.numa):
        # memory split in proportion to the vCPUs of each node; the last node takes the rest
        size = remaining if i == len(topo.numa) - 1 else topo.memory_mb * len(vcpus) // total_vcpus
        remaining -= size
        backend = "memory-backend-memfd" if shared else "memory-backend-ram"
        args += ["-object", f"{backend},id=mem{i},size={size}M,host-nodes={node},policy=bind{',share=on' if shared else ''}"]
        cpus = ",".join(f"cpus={c}" for c in vcpus)
        args += ["-numa", f"node,nodeid={i},{cpus},memdev=mem{i}"]
    return args


def pin_vcpus(thread_ids, topo, qemu_pid=None):
    """Pin each vCPU thread to its host core (thread_ids: vCPU index -> host thread id), and
    qemu's other threads to the emulator cores when the template keeps some."""
    if topo.emulator_cores and qemu_pid:
        for tid in os.listdir(f"/proc/{qemu_pid}/task"):
            os.sched_setaffinity(int(tid), set(topo.emulator_cores))  # threads made later inherit it
    for index, tid in thread_ids.items():
        os.sched_setaffinity(tid, {topo.cores[index % topo.vcpus]})
