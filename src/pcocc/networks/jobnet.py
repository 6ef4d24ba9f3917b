"""A job's networks: which ones a node and a VM use, and the node's part in making them.

A VM is on the networks of its template's resource set, in that order (its
NICs' order). Node setup learns which VMs it hosts from SLURM (their ranks)
and what they are from the cluster's record, which the launcher writes while
the step starts: it waits for it. Nodes with a tunnelled network then publish
their tunnel endpoint in their node record and wait for the other nodes' ones.
"""

import logging
import socket
import time
from dataclasses import dataclass, field

from pcocc import networks, state
from pcocc.cluster import settings_runs, vm_count
from pcocc.errors import PcoccError, TimeoutExpired
from pcocc.runner import run

log = logging.getLogger("pcocc.setup")

WAIT_TIMEOUT = 120  # for the cluster's record, then for the other nodes (the plugin allows 300 s in all)
TUNNEL_IP_ENV = "PCOCC_TUNNEL_IP"  # this node's tunnel endpoint, when it is not its SLURM NodeAddr


@dataclass
class NodeJob:
    """What a driver's node_setup needs to know about the job on this node, for one network."""

    jobid: int
    uid: int
    host: str
    ranks: list  # the VM ranks on this node that use the network
    nodes: list  # every node of the step, in SLURM's order (a tunnel port is named by its index)
    peers: dict  # {host: tunnel endpoint} of the other nodes on the network
    environ: dict  # of the host tools (OVS_RUNDIR)
    store: object
    undo: object  # pcocc.networks.undo.UndoLog
    owner_alive: object  # f(pool owner "JOBID:NAME") -> whether its job still runs
    nodes_key: str  # store prefix of the job's node records
    members: list = ()  # every VM rank of the cluster on the network (DHCP and DNS know them all)
    state_dir: str = None  # the node's state dir (files of the job's daemons)
    address: str = None  # this node's address, where reverse NAT ports are reached


@dataclass
class NodePlan:
    networks: dict = field(default_factory=dict)  # name -> (Network, driver, [local ranks]), first use first
    members: dict = field(default_factory=dict)  # name -> [every VM rank of the cluster on it]
    endpoint: str = None
    endpoints: dict = field(default_factory=dict)  # name -> this node's endpoint on a network with a host-if-suffix

    def record(self):
        """What this node publishes for its peers."""
        out = {"networks": list(self.networks), "endpoint": self.endpoint}
        if self.endpoints:
            out["endpoints"] = dict(self.endpoints)
        return out


def vm_networks(config, settings):
    """The Networks of a VM with these template settings, in NIC order."""
    name = settings.get("resource-set")
    if not name:
        return []
    rset = config.resources.get(name)
    if rset is None:
        raise PcoccError(f"resource set '{name}' is not in resources.yaml (any more)")
    return [config.networks[n] for n in rset.networks]


def wait_info(store, user, jobid, alive, timeout=WAIT_TIMEOUT):
    """The cluster's record, once the launcher has written it."""
    key = state.cluster_prefix(user, jobid) + "info"
    deadline = time.monotonic() + timeout
    while True:
        info = store.wait(key, bool, min(2.0, max(0.0, deadline - time.monotonic())))
        if info:
            return next(iter(info.values()))
        if not alive(jobid):
            raise PcoccError(f"job {jobid} ended before its cluster was recorded")
        if time.monotonic() >= deadline:
            raise TimeoutExpired(f"no cluster record for job {jobid} after {timeout} s (was it started by pcocc?)")


def plan(config, info, ranks, environ, host, multi_node=True):
    """This node's networks: the ones its VMs (ranks) use, each checked on this node."""
    out = NodePlan()
    runs = [(first, count, vm_networks(config, settings)) for _, settings, first, count in settings_runs(info)]
    for first, count, nets in runs:  # each template (each run of ranks) once, not each VM
        for net in nets:
            out.members.setdefault(net.name, []).extend(range(first, first + count))
    for rank in ranks:
        nets = next((nets for first, count, nets in runs if first <= rank < first + count), None)
        if nets is None:
            raise PcoccError(f"VM rank {rank} is not in the cluster's record ({vm_count(info)} VMs)")
        for net in nets:
            if net.name not in out.networks:
                driver = networks.driver(net)
                driver.check()
                out.networks[net.name] = (net, driver, [])
            out.networks[net.name][2].append(rank)
    if multi_node and any(d.needs_peers for _, d, _ in out.networks.values()):
        out.endpoint = tunnel_endpoint(environ, host)
        for name, (net, driver, _) in out.networks.items():
            suffix = net.settings.get("host-if-suffix") if driver.needs_peers else None
            if suffix:
                out.endpoints[name] = suffixed_endpoint(host, suffix)
    return out


def tunnel_endpoint(environ, host):
    """This node's VXLAN endpoint: $PCOCC_TUNNEL_IP, else its SLURM NodeAddr (resolved)."""
    if environ.get(TUNNEL_IP_ENV):
        return environ[TUNNEL_IP_ENV]
    return node_address(environ, host)


def suffixed_endpoint(host, suffix, resolve=None):
    """This node's tunnel endpoint on a network with a `host-if-suffix`: the address of the
    node's name with the suffix appended (pcocc-networks.yaml(5): computeXX with suffix -ib is
    reached at computeXX-ib, e.g. over IPoIB). Returns an IPv4 address as text; raises
    PcoccError when the name does not resolve."""
    name = f"{host}{suffix}"
    try:
        return (resolve or socket.gethostbyname)(name)
    except OSError:
        raise PcoccError(f"cannot resolve {name}, the tunnel endpoint of node {host} (its name and the network's "
                         f"host-if-suffix {suffix!r})") from None


def peer_endpoint(record, network):
    """A peer's tunnel endpoint on a network, from its node record (its suffixed one if it has one)."""
    return (record.get("endpoints") or {}).get(network) or record["endpoint"]


def node_address(environ, host):
    """This node's address as SLURM knows it (NodeAddr, resolved)."""
    out = run(["scontrol", "show", "node", host, "-o"], env=environ).stdout
    addr = next((f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr=")), host)
    try:
        return socket.gethostbyname(addr)
    except OSError:
        raise PcoccError(f"cannot resolve the address {addr} of node {host}") from None


def expand_nodes(nodelist, environ=None):
    """SLURM's node list syntax (node[1-3],gpu1) as a list of names, in SLURM's order."""
    if "[" not in nodelist:
        return [n for n in nodelist.split(",") if n]
    return run(["scontrol", "show", "hostnames", nodelist], env=environ).stdout.split()


def wait_peers(store, peers_key, nodes, host, alive, jobid, timeout=WAIT_TIMEOUT):
    """{host: record} of the other nodes, once each has published its networks.

    peers_key: the store prefix where each node publishes what its peers need ({networks,
    endpoint[, endpoints]} of NodePlan.record, or {state: failed, error}: state.peers_prefix).
    The records are read once, then followed (Store.follow: only the records that
    change, not every node's at each change). alive(jobid) is asked every 2 s while some
    node is missing. Raises PcoccError when a node failed or the job ended, TimeoutExpired
    after timeout s (naming the nodes missing)."""
    others = [n for n in nodes if n != host]
    other_set = set(others)
    deadline = time.monotonic() + timeout

    def ready(record):
        return record is not None and ("networks" in record or record.get("state") == "failed")

    with store.follow(peers_key) as follower:
        records = {k.rsplit("/", 1)[1]: v for k, v in follower.items.items()}
        waiting = {n for n in others if not ready(records.get(n))}
        failed = any((records.get(n) or {}).get("state") == "failed" for n in others)
        checked = time.monotonic()
        while True:
            if failed:
                first = next(n for n in others if (records.get(n) or {}).get("state") == "failed")
                raise PcoccError(f"node {first} failed: {records[first].get('error', 'unknown reason')}")
            if not waiting:
                return {n: records[n] for n in others}
            now = time.monotonic()
            if now - checked >= 2.0:
                checked = now
                if not alive(jobid):
                    raise PcoccError(f"job {jobid} ended while its nodes were being set up")
            if now >= deadline:
                missing = [n for n in others if n not in records]
                raise TimeoutExpired(f"nodes {', '.join(missing) or '?'} did not publish their network setup in {timeout} s")
            for key, value in follower.changes(min(2.0, max(0.0, deadline - now))).items():
                name = key.rsplit("/", 1)[1]
                if value is None:
                    records.pop(name, None)
                else:
                    records[name] = value
                if name in waiting and ready(value):
                    waiting.discard(name)
                elif name not in waiting and name in other_set and not ready(value):
                    waiting.add(name)  # gone again
                failed = failed or (name in other_set and (value or {}).get("state") == "failed")


def setup_node(node_plan, peer_records, common):
    """Create this node's part of each network; common holds the NodeJob fields they share."""
    done = {}
    for name, (net, driver, ranks) in node_plan.networks.items():
        peers = {h: peer_endpoint(r, name) for h, r in peer_records.items() if name in r.get("networks", ())}
        done[name] = driver.node_setup(NodeJob(ranks=ranks, peers=peers, members=node_plan.members.get(name, ranks), **common))
    return done


def nic_args(config, settings, jobid, rank, objects=None):
    """[qemu arguments of one NIC] for each network of the VM, in order.

    objects: what node setup published for each network on this node ({name: ...}, the
    node record's "objects"), for drivers that need it (uses_node_objects: which VF a VM got).
    """
    out = []
    for i, net in enumerate(vm_networks(config, settings)):
        driver = networks.driver(net)
        if getattr(driver, "uses_node_objects", False):
            out.append(driver.nic_args(jobid, rank, i, settings["nic-model"], objects=(objects or {}).get(net.name)))
        else:
            out.append(driver.nic_args(jobid, rank, i, settings["nic-model"]))
    return out


def needs_node_objects(config, settings):
    """Whether the VM's NICs need what node setup published (nic_args' objects)."""
    return any(getattr(networks.lookup(n.type).driver, "uses_node_objects", False) for n in vm_networks(config, settings))


def vm_macs(config, settings, jobid, rank):
    """The MAC of each NIC of the VM, in NIC order (the networks that give it a NIC of its own)."""
    return [d.mac(jobid, rank) for d in map(networks.driver, vm_networks(config, settings)) if hasattr(d, "mac")]


def unmigratable_networks(config, settings):
    """Names of the VM's networks that a checkpoint or migration cannot carry (a passed-through device)."""
    return [n.name for n in vm_networks(config, settings) if not getattr(networks.lookup(n.type).driver, "migratable", True)]


def licenses(config, settings_list):
    """SLURM licenses ["name" or "name:count"] a cluster of VMs with these settings needs:
    one per network with a `license` setting (a PKey is per cluster, not per VM)."""
    from collections import Counter

    nets = {n.name: n for s in settings_list for n in vm_networks(config, s)}
    counts = Counter(n.settings["license"] for n in nets.values() if n.settings.get("license"))
    return [lic if c == 1 else f"{lic}:{c}" for lic, c in sorted(counts.items())]


def undo_actions(environ, store):
    """{kind: undo} of every kind of object a node setup records."""
    from pcocc.allocator import Pool
    from pcocc.networks import hostnet, infiniband, vfio

    return {**hostnet.undo_actions(environ), "pool": lambda **args: release_pool(store, **args),
            "pool-own": lambda pool, owner: Pool(store, pool, 0, 0).release(owner),  # ids of one node's VMs
            **vfio.undo_actions(environ), **infiniband.undo_actions(environ, store)}


def release_pool(store, pool, owner, nodes, host):
    """Give the job's id back once no other node of the job holds it (the last one out does).

    Each node deletes its own record before this check (nodesetup.delete), so of nodes
    leaving at once at least the last sees no other: the id is always given back.
    """
    from pcocc.allocator import Pool

    others = [k for k in store.range(nodes) if k.rsplit("/", 1)[1] != host]
    if not others:
        Pool(store, pool, 0, 0).release(owner)
