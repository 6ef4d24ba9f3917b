"""Names, addresses and the network objects of one harness: a host bridge and one netns per node.

Every name, the subnet and the ports derive from a short id of the base dir, so
two harnesses with different bases can run side by side; a clash is refused.
"""

import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pcocc.errors import PcoccError
from pcocc.runner import run

NETNS_DIR = Path("/run/netns")


class ClashError(PcoccError):
    """Something the harness would create already exists."""


@dataclass(frozen=True)
class Layout:
    """Everything derived from the base dir and the node count."""

    base: Path
    nodes: int

    @property
    def id(self):
        return hashlib.sha1(str(self.base).encode()).hexdigest()[:6]

    @property
    def _digest(self):
        return hashlib.sha1(str(self.base).encode()).digest()

    @property
    def bridge(self):
        return f"pct{self.id}"

    @property
    def subnet(self):
        d = self._digest
        return ipaddress.ip_network(f"10.{200 + d[3] % 50}.{d[4]}.0/24")

    @property
    def host_ip(self):
        return str(self.subnet.network_address + 1)

    @property
    def prefixlen(self):
        return self.subnet.prefixlen

    @property
    def port_base(self):
        # 10000-29996: below the ephemeral range, so no client socket holds them
        return 10000 + int(self.id, 16) % 5000 * 4

    @property
    def slurmctld_port(self):
        return self.port_base

    @property
    def etcd_port(self):
        return self.port_base + 1

    @property
    def etcd_peer_port(self):
        return self.port_base + 2

    @property
    def node_names(self):
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def netns(self, node):
        return f"pcocc-{self.id}-{node}"

    def veth(self, node):
        return f"pcv{self.id}{node[4:]}"  # IFNAMSIZ is 16: pcv + 6 + up to 3 digits

    def node_ip(self, node):
        return str(self.subnet.network_address + 10 + int(node[4:]))

    # The VXLAN underlay of the nodes' OVS (--ovs): a second bridge and veth per node.
    # OVS's userspace datapath needs the tunnel endpoint IP on an OVS bridge that owns
    # the underlay port; moving eth0 (slurmd's) into OVS would put slurmd behind it.

    @property
    def tunnel_bridge(self):
        return f"pcu{self.id}"

    @property
    def tunnel_subnet(self):
        # only seen inside the node namespaces, beside eth0's subnet: it just must differ from it
        d = self._digest
        return ipaddress.ip_network(f"10.{200 + d[3] % 50}.{(d[4] + 128) % 256}.0/24")

    def tunnel_veth(self, node):
        return f"pcw{self.id}{node[4:]}"

    def tunnel_ip(self, node):
        return str(self.tunnel_subnet.network_address + 10 + int(node[4:]))


def link_exists(name):
    return Path("/sys/class/net", name).exists()


def netns_exists(name):
    return (NETNS_DIR / name).exists()


def _port_busy(host, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _used_networks():
    nets = []
    for cmd in (["ip", "-j", "-4", "addr"], ["ip", "-j", "-4", "route"]):
        for entry in json.loads(run(cmd).stdout or "[]"):
            for a in entry.get("addr_info", []):
                nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
            dst = entry.get("dst")
            if dst and dst != "default":
                nets.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
    return nets


def check_clashes(layout, ovs=False):
    """Raise ClashError naming whatever already exists (another harness, or a leftover)."""
    problems = []
    links = [layout.bridge, *map(layout.veth, layout.node_names)]
    if ovs:
        links += [layout.tunnel_bridge, *map(layout.tunnel_veth, layout.node_names)]
    problems += [f"network interface {link} exists" for link in links if link_exists(link)]
    for node in layout.node_names:
        if netns_exists(layout.netns(node)):
            problems.append(f"network namespace {layout.netns(node)} exists")
    for net in _used_networks():
        if net.overlaps(layout.subnet):
            problems.append(f"subnet {layout.subnet} overlaps {net}, already in use on this host")
            break
    for port in (layout.slurmctld_port, layout.etcd_port, layout.etcd_peer_port):
        if _port_busy("0.0.0.0", port):
            problems.append(f"TCP port {port} is in use")
    if problems:
        raise ClashError(
            f"test cluster {layout.id} ({layout.base}) clashes with what exists: " + "; ".join(problems),
            hint=f"if it is a leftover, run `pcocc-testcluster down --base {layout.base}`; else choose another --base",
        )


def create(state, layout, ovs):
    """Bridge, then one netns per node with a veth to it; each recorded before it is made."""
    if not NETNS_DIR.is_dir() and state.get("netns_dir_created") is None:
        state.set(netns_dir_created=True)  # `ip netns add` makes /run/netns a mount point: undo it
    state.add("links", layout.bridge)
    _ip_batch([
        f"link add {layout.bridge} type bridge",
        f"addr add {layout.host_ip}/{layout.prefixlen} dev {layout.bridge}",
        f"link set {layout.bridge} up",
    ])
    for node in layout.node_names:
        ns, veth = layout.netns(node), layout.veth(node)
        state.add("netns", ns)
        run(["ip", "netns", "add", ns])
        state.add("links", veth)
        _ip_batch([
            f"link add {veth} type veth peer name eth0 netns {ns}",
            f"link set {veth} master {layout.bridge} up",
        ])
        _ip_batch([
            "link set lo up",
            f"addr add {layout.node_ip(node)}/{layout.prefixlen} dev eth0",
            "link set eth0 up",
            f"route add default via {layout.host_ip}",
        ], netns=ns)
        if ovs:
            # OVS's userspace datapath forwards partial checksums unfixed: TCP over
            # a veth in OVS breaks unless the senders compute them
            run(["ethtool", "-K", veth, "tx", "off"], capture=True)
            run(["nsenter", f"--net={NETNS_DIR / ns}", "ethtool", "-K", "eth0", "tx", "off"])
    if ovs:
        _create_tunnel_underlay(state, layout)


TUNNEL_MTU = 9000  # room for VXLAN's 50 bytes around the VMs' 1500-byte frames
TUNNEL_DEV = "tun0"  # in each node; ovs.py puts it in the node's br-phy


def _create_tunnel_underlay(state, layout):
    state.add("links", layout.tunnel_bridge)
    _ip_batch([f"link add {layout.tunnel_bridge} mtu {TUNNEL_MTU} type bridge", f"link set {layout.tunnel_bridge} up"])
    for node in layout.node_names:
        veth = layout.tunnel_veth(node)
        state.add("links", veth)
        _ip_batch([
            f"link add {veth} mtu {TUNNEL_MTU} type veth peer name {TUNNEL_DEV} netns {layout.netns(node)}",
            f"link set {veth} master {layout.tunnel_bridge} up",
        ])
        _ip_batch([f"link set {TUNNEL_DEV} mtu {TUNNEL_MTU} up"], netns=layout.netns(node))


def _ip_batch(lines, netns=None):
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(argv, input="\n".join(lines) + "\n")


def netns_pids(ns):
    if not netns_exists(ns):
        return []
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def destroy(state, timeout=5.0):
    """Delete the recorded namespaces and links; idempotent."""
    for ns in state["netns"]:
        if netns_exists(ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for link in state["links"]:
        if link_exists(link):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
    # netns teardown is asynchronous: the host ends of veths linger for a moment
    deadline = time.monotonic() + timeout
    while any(link_exists(link) for link in state["links"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    if state.get("netns_dir_created"):
        _unmount_netns_dir()


def _unmount_netns_dir():
    """Undo the /run/netns mount that `ip netns add` made, if nobody else uses it now."""
    try:
        if os.listdir(NETNS_DIR):
            return
    except FileNotFoundError:
        return
    # a plain umount fails (EBUSY) if another harness mounted a namespace there meanwhile
    if subprocess.run(["umount", str(NETNS_DIR)], capture_output=True).returncode == 0:
        try:
            NETNS_DIR.rmdir()
        except OSError:
            pass


def leftovers(state):
    """What of the recorded network objects still exists (for status and tests)."""
    return [f"netns {ns}" for ns in state["netns"] if netns_exists(ns)] + [
        f"link {link}" for link in state["links"] if link_exists(link)
    ]
