"""The L3 side of an `ethernet` network on one node: the job's gateway.

Every node of a job runs its own copy of the gateway, in a network namespace
of its own (one per job, network and node), plugged into the job's bridge as a
*protected* port: NORMAL switching never forwards between protected ports, and
the VXLAN tunnels are protected too, so each VM only ever talks to the gateway
of its own node (same IP and MAC on every node, no flapping), while the VMs
still see each other across nodes.

    VM --tap-- [job bridge] --veth "gw"-- [gateway netns] --veth "up"-- node --> outside
                  |  (VXLAN to the other nodes)     dnsmasq (DHCP + DNS)

Addresses: vmN is int-network's host N+1 on every cluster (clusters never
share a segment), the gateway is its last host. Each VM also has an external
address, unique over ext-network and allocated in the store: the gateway
namespace maps it 1:1 to the VM's internal one, the node routes it to the
job's uplink, masquerades it on the way out (allow-outbound) and maps a host
port allocated in the store to it (reverse-nat). New connections into the
uplink that the node did not map itself are dropped: another job's VM cannot
reach this job's external addresses directly.
"""

import hashlib
import ipaddress
import logging
import os
import socket

from pcocc.errors import PcoccError
from pcocc.networks import names
from pcocc.runner import run

LINK_ADDR = "169.254.0.1"  # the node's end of every gateway's uplink (routes, not this address, tell them apart)
LEASE_TIME = "infinite"  # a VM's lease lasts as long as its cluster (the original's rule): no renewal to miss
FORWARD_CHAIN = "PCOCC-FORWARD"  # the node's forwarding rules of every job (FORWARD jumps to it first)
VXLAN_OVERHEAD = 50  # bytes a VXLAN tunnel adds to each frame (pcocc-networks.yaml(5), `mtu`)


def vm_mtu(settings):
    """The MTU the VMs' interfaces must use on an `ethernet` network, in bytes: the network's
    `mtu` less the VXLAN encapsulation (pcocc-networks.yaml(5): "set 50 bytes lower than this
    value"; an L3 network's DHCP hands it out, a virtio NIC is told it as host_mtu)."""
    return settings["mtu"] - VXLAN_OVERHEAD


class Addressing:
    """Where each VM, the gateway and the external addresses sit, from the network's settings."""

    def __init__(self, settings, name):
        self.name = name
        self.int_net = ipaddress.ip_network(settings["int-network"], strict=False)
        self.ext_net = ipaddress.ip_network(settings["ext-network"], strict=False)
        if self.int_net.num_addresses < 4 or self.ext_net.num_addresses < 4:
            raise PcoccError(f"network '{name}': int-network and ext-network need room for at least 2 hosts")
        self.gateway = self.int_net[-2]

    def vm_ip(self, rank):
        if rank + 1 >= self.int_net.num_addresses - 2:
            raise PcoccError(f"network '{self.name}': vm{rank} does not fit in int-network {self.int_net}")
        return self.int_net[rank + 1]

    def ext_pool(self):
        """(pool name, first, last) of the external addresses, as indexes into ext-network."""
        return (f"extip-{self.name}", 1, self.ext_net.num_addresses - 2)

    def ext_ip(self, index):
        return self.ext_net[index]


def gateway_mac(network):
    """The gateway's MAC: the same on every node and for every job of the network, so that a VM
    restarted from a checkpoint (ARP cache included) finds its gateway at once."""
    digest = hashlib.sha1(f"pcocc-gateway:{network}".encode()).digest()[:5]
    return ":".join(f"{b:02x}" for b in (0x02, *digest))


def netns_name(jobid, network, host, state_dir=None):
    """The name of a job's gateway namespace on a node: pcocc-<host>-<job>-<network>[-<tag>].

    /run/netns is host-wide: the nodes of a test cluster (network namespaces of one host)
    share it, hence the host in the name; and so do several test clusters, or a test cluster
    and the host's own local backend, whose nodes and job ids repeat (node1, job 1): tag, 6
    hex digits of the node state dir's sha1, tells them apart (a real node has one state dir:
    its tag never changes)."""
    return f"pcocc-{host}-{jobid}-{network}{netns_tag(state_dir)}"


def netns_tag(state_dir):
    """The end of netns_name for a node state dir: "-" and 6 hex digits ("" without one)."""
    return f"-{hashlib.sha1(os.path.realpath(state_dir).encode()).hexdigest()[:6]}" if state_dir else ""


def hostname(settings, rank):
    return f"vm{rank}"


def host_domain(getfqdn=socket.getfqdn):
    """This host's DNS domain: its fully qualified name less the first label ("" when it has none)."""
    return getfqdn().strip(".").partition(".")[2]


def domain_name(settings, getfqdn=socket.getfqdn):
    """The VMs' DNS domain on this network: `domain-name`, else pcocc.<the host's DNS domain>,
    or pcocc when the host has none (pcocc-networks.yaml(5), `domain-name`). No trailing dot."""
    written = settings["domain-name"].strip(".")
    if written:
        return written
    host = host_domain(getfqdn)
    return f"pcocc.{host}" if host else "pcocc"


def fqdn(settings, rank, getfqdn=socket.getfqdn):
    return f"vm{rank}.{domain_name(settings, getfqdn)}"


def upstream_dns(settings):
    """dnsmasq lines that say where the names outside the cluster are resolved
    (pcocc-networks.yaml(5), `dns-server`): the given server only; none at all when
    the VMs may not reach outside (allow-outbound: none), as the original does; else
    the servers of `resolv-file` (the host's resolvers, /etc/resolv.conf)."""
    if settings["dns-server"]:
        return [f"server={settings['dns-server']}", "no-resolv"]
    if settings["allow-outbound"] == "none":
        return ["no-resolv"]
    return [f"resolv-file={settings['resolv-file']}"]


def loopback_resolvers(path):
    """The nameservers of a resolv.conf file that sit on loopback (the gateway's namespace
    cannot reach them); [] when the file cannot be read."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        if ipaddress.ip_address(fields[1].split("%")[0]).is_loopback:
                            out.append(fields[1])
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def readable_by_anyone(path):
    """Whether a file can be read by any user (dnsmasq reads its resolv-file after dropping
    root): the file readable by others, each directory above it enterable by others."""
    try:
        path = os.path.abspath(path)
        if not os.stat(path).st_mode & 0o004:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def dnsmasq_conf(settings, addressing, macs, lease_file, getfqdn=socket.getfqdn):
    """dnsmasq's configuration (the text of its conf file): fixed leases and names for every
    VM of the cluster (macs: {rank: mac}). As the original does (pcocc-networks.yaml(5)): the
    VMs get the network's mtu less the VXLAN overhead by DHCP (vm_mtu), leases that
    never expire, the domain of domain_name(), and DNS that forwards as upstream_dns() says."""
    s, a = settings, addressing
    lines = [
        "interface=gw", "bind-interfaces", "except-interface=lo", "no-hosts", "dhcp-authoritative",
        f"dhcp-leasefile={lease_file}",
        f"dhcp-range={a.int_net.network_address},static,{a.int_net.netmask},{LEASE_TIME}",
        f"dhcp-option=option:router,{a.gateway}",
        f"dhcp-option=option:dns-server,{a.gateway}",
        f"dhcp-option=option:mtu,{vm_mtu(s)}",
    ]
    domain = domain_name(s, getfqdn)
    lines += [f"domain={domain}", f"local=/{domain}/"]  # domain= is also DHCP's domain name
    # dns-search: "in addition to the domain name" (pcocc-networks.yaml(5))
    search = [domain] + [d for d in s["dns-search"].replace(",", " ").split() if d != domain]
    lines.append(f"dhcp-option=option:domain-search,{','.join(search)}")
    if s["ntp-server"]:
        lines.append(f"dhcp-option=option:ntp-server,{s['ntp-server']}")
    lines += upstream_dns(s)
    for rank, mac in sorted(macs.items()):
        ip = a.vm_ip(rank)
        lines.append(f"dhcp-host={mac},{ip},{hostname(s, rank)},{LEASE_TIME}")
        lines.append(f"host-record={fqdn(s, rank, getfqdn)},{hostname(s, rank)},{ip}")
    return "\n".join(lines) + "\n"


def setup(job, network, bridge, vm_mac):
    """Make this node's gateway of the job (jobnet.NodeJob) on `network`, whose bridge is made;
    returns what the node publishes (vm_mac(rank): the MAC of a VM)."""
    a = Addressing(network.settings, network.name)
    ns = netns_name(job.jobid, network.name, job.host, job.state_dir)
    ranks = sorted(job.ranks)
    ext, ports = _allocate(job, network, a, ranks)
    uplink = _namespace(job, network, a, ns, bridge, ext)
    _node_rules(job, network, a, uplink, ext, ports)
    _dnsmasq(job, network, a, ns, {rank: vm_mac(rank) for rank in job.members})
    rnat = network.settings.get("reverse-nat")
    return {
        "netns": ns,
        "gateway": str(a.gateway),
        "address": job.address,
        "vm_port": rnat["vm-port"] if rnat else None,
        "vms": {str(rank): {"ip": str(a.vm_ip(rank)), "ext_ip": str(ext[rank]), **({"host_port": ports[rank]} if rank in ports else {})}
                for rank in ranks},
    }


def _allocate(job, network, a, ranks):
    """({rank: external address}, {rank: host port}) of this node's VMs, from the store's pools."""
    from pcocc.allocator import Pool

    owner = f"{job.jobid}:{network.name}:{job.host}"
    job.undo.record(job.jobid, "pool-own", pool=a.ext_pool()[0], owner=owner)
    ext = dict(zip(ranks, map(a.ext_ip, Pool(job.store, *a.ext_pool()).allocate(owner, len(ranks), alive=job.owner_alive))))
    ports = {}
    rnat = network.settings.get("reverse-nat")
    if rnat:  # host ports are the node's: a pool per node
        pool = (f"hostport-{job.host}", rnat["min-host-port"], rnat["max-host-port"])
        job.undo.record(job.jobid, "pool-own", pool=pool[0], owner=owner)
        ports = dict(zip(ranks, Pool(job.store, *pool).allocate(owner, len(ranks), alive=job.owner_alive)))
    return ext, ports


def _namespace(job, network, a, ns, bridge, ext):
    """The gateway's namespace: "gw" on the job's bridge, "up" to the node, 1:1 NAT between
    internal and external addresses. Returns the node's end of the uplink."""
    from pcocc.networks import hostnet

    s, jobid, undo, environ = network.settings, job.jobid, job.undo, job.environ
    ovs, ip, iptables = hostnet.Ovs(environ), hostnet.Ip(environ), hostnet.Iptables(environ, ns)
    gw_port = names.dev_name(s["dev-prefix"], "g", jobid)
    uplink = names.dev_name(s["dev-prefix"], "h", jobid)
    undo.record(jobid, "netns", name=ns)  # its rules and addresses go with it
    ip.add_netns(ns)
    undo.record(jobid, "link", name=gw_port)
    ip.add_veth_into(gw_port, "gw", ns, s["mtu"], gateway_mac(network.name))
    undo.record(jobid, "ovs-port", bridge=bridge, port=gw_port)
    ovs.add_port(bridge, gw_port, protected=True)
    undo.record(jobid, "link", name=uplink)
    ip.add_veth_into(uplink, "up", ns, s["mtu"])
    if hostnet.ovs_datapath(s["datapath-type"]) == "netdev":
        hostnet.tx_checksum_off("gw", environ, ns)
    ip.addr_add("gw", f"{a.gateway}/{a.int_net.prefixlen}", netns=ns)
    for rank, address in ext.items():
        ip.addr_add("up", f"{address}/32", netns=ns)
        iptables.add("nat", "PREROUTING", ["-d", str(address), "-j", "DNAT", "--to-destination", str(a.vm_ip(rank))])
        iptables.add("nat", "POSTROUTING", ["-s", str(a.vm_ip(rank)), "-o", "up", "-j", "SNAT", "--to-source", str(address)])
    ip.route_add(LINK_ADDR, "up", netns=ns)
    ip.route_add("default", "up", via=LINK_ADDR, netns=ns)
    hostnet.sysctl("net.ipv4.ip_forward", 1, environ, ns)
    if s["allow-outbound"] == "none":
        iptables.add("filter", "FORWARD", ["-i", "gw", "-o", "up", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"])
    return uplink


def _node_rules(job, network, a, uplink, ext, ports):
    """The node's side: routes to the external addresses, forwarding, masquerade out, reverse NAT in."""
    from pcocc.networks import hostnet

    s, jobid, environ = network.settings, job.jobid, job.environ
    ip, iptables = hostnet.Ip(environ), hostnet.Iptables(environ)
    ip.addr_add(uplink, f"{LINK_ADDR}/32")
    for address in ext.values():
        ip.route_add(f"{address}/32", uplink)
    if s["manage-ip-forward"]:
        hostnet.sysctl("net.ipv4.ip_forward", 1, environ)
    tag = ["-m", "comment", "--comment", f"pcocc job {jobid}"]
    # Our own chain, so that every job's DROP (inserted) comes before any job's ACCEPT (appended):
    # interleaved, a later job's "-i its uplink ACCEPT" would let it into an earlier job's uplink.
    job.undo.record(jobid, "iptables-chain", table="filter", chain=FORWARD_CHAIN, parent="FORWARD")  # undone after its rules
    iptables.ensure_chain("filter", FORWARD_CHAIN, "FORWARD")
    rules = [
        ("filter", FORWARD_CHAIN, ["-o", uplink, "-m", "conntrack", "--ctstate", "NEW", "-m", "conntrack", "!", "--ctstate", "DNAT",
                                   "-j", "DROP", *tag], True),
        ("filter", FORWARD_CHAIN, ["-i", uplink, "-j", "ACCEPT", *tag], False),
        ("filter", FORWARD_CHAIN, ["-o", uplink, "-j", "ACCEPT", *tag], False),
    ]
    for rank, address in ext.items():
        rules.append(("nat", "POSTROUTING", ["-s", f"{address}/32", "!", "-d", str(a.ext_net), "-j", "MASQUERADE", *tag], False))
        if rank in ports:
            dnat = ["-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", str(ports[rank]),
                    "-j", "DNAT", "--to-destination", f"{address}:{s['reverse-nat']['vm-port']}", *tag]
            rules += [("nat", "PREROUTING", dnat, False), ("nat", "OUTPUT", dnat, False)]
    for table, chain, rule, insert in rules:
        job.undo.record(jobid, "iptables", table=table, chain=chain, rule=rule)
        iptables.add(table, chain, rule, insert=insert)


def _dnsmasq(job, network, a, ns, macs):
    """DHCP and DNS for the whole cluster (macs: {rank: MAC} of every VM): the same answers on every node."""
    from pcocc.networks import hostnet

    s = network.settings
    if not s["dns-server"] and s["allow-outbound"] != "none" and loopback_resolvers(s["resolv-file"]):
        logging.getLogger("pcocc.setup").warning(
            "network '%s': %s names resolvers on loopback (%s), which the gateway's namespace cannot reach: "
            "VMs will not resolve outside names; set dns-server (or resolv-file)", network.name, s["resolv-file"],
            ", ".join(loopback_resolvers(s["resolv-file"])))
    if not s["dns-server"] and s["allow-outbound"] != "none" and not readable_by_anyone(s["resolv-file"]):
        logging.getLogger("pcocc.setup").warning(
            "network '%s': dnsmasq cannot read %s once it drops root: VMs will not resolve outside names; "
            "make it (and its directories) readable by all, or set dns-server", network.name, s["resolv-file"])
    base = os.path.join(job.state_dir, f"dnsmasq-{job.jobid}-{network.name}")
    for ext in (".conf", ".leases", ".log"):
        job.undo.record(job.jobid, "file", path=base + ext)
    with open(base + ".conf", "w") as f:
        f.write(dnsmasq_conf(network.settings, a, macs, base + ".leases"))
    job.undo.record(job.jobid, "process", pidfile=base + ".pid", name="dnsmasq")
    run(hostnet.in_netns(ns, ["dnsmasq", f"--conf-file={base}.conf", f"--pid-file={base}.pid", f"--log-facility={base}.log"]),
        env=job.environ)
