"""Thin drivers of the host's network tools: ovs-vsctl, ip, iptables and dnsmasq, through the one runner.

Each creating call has an idempotent undo, listed in undo_actions() under the
kind the undo log records. The OVS commands reach the node's own Open vSwitch
through OVS_RUNDIR in the environment they are given (a node may run its own
instance, as the test cluster does).
"""

import os
import signal
import socket
import struct
import time

from pcocc.errors import CommandError
from pcocc.runner import run

OVS_TIMEOUT = 30  # seconds ovs-vsctl waits for ovsdb-server and ovs-vswitchd


def genl_family_exists(family):
    """Whether the kernel has the generic netlink family `family` (asked with CTRL_CMD_GETFAMILY,
    which any user may do; a family is visible from every network namespace)."""
    name = family.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), 2) + name + b"\0" * (-len(name) % 4)  # CTRL_ATTR_FAMILY_NAME
    body = struct.pack("=BBH", 3, 1, 0) + attr  # CTRL_CMD_GETFAMILY, version 1
    request = struct.pack("=IHHII", 16 + len(body), 0x10, 1, 1, 0) + body  # to GENL_ID_CTRL, NLM_F_REQUEST
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16) as s:  # NETLINK_GENERIC
            s.settimeout(5)
            s.send(request)
            reply = s.recv(65536)
    except OSError:
        return False  # no generic netlink: no family
    # the family's description (type GENL_ID_CTRL), or NLMSG_ERROR (ENOENT) when it is not registered
    return len(reply) >= 16 and struct.unpack_from("=H", reply, 4)[0] == 0x10


def kernel_has_ovs_datapath():
    """Whether this kernel has Open vSwitch's datapath (the openvswitch module, loaded or built in)."""
    return genl_family_exists("ovs_datapath")


def ovs_datapath(datapath_type="auto", kernel_has_it=None):
    """The Open vSwitch datapath to use: datapath_type when it is 'system' or 'netdev'; for
    'auto', the kernel's ('system') where this kernel has it, else the userspace one ('netdev').
    The node setup (the bridge) and the VM's qemu (the tap's options) ask the same kernel, so
    they agree."""
    if datapath_type != "auto":
        return datapath_type
    return "system" if (kernel_has_it or kernel_has_ovs_datapath)() else "netdev"


VXLAN_BATCH = 200  # tunnel ports per ovs-vsctl call (about 30 KiB of arguments)

class Ovs:
    def __init__(self, environ=None):
        self.environ = environ

    def vsctl(self, *args):
        # without --no-wait: returns once ovs-vswitchd has applied the change (the port exists)
        return run(["ovs-vsctl", f"--timeout={OVS_TIMEOUT}", *args], env=self.environ, timeout=OVS_TIMEOUT + 5).stdout

    def add_bridge(self, bridge, datapath_type="system"):
        self.vsctl("add-br", bridge, "--", "set", "bridge", bridge, f"datapath_type={datapath_type}")

    def del_bridge(self, bridge):
        self.vsctl("--if-exists", "del-br", bridge)

    def add_port(self, bridge, port, protected=False, vlans=None):
        """An existing network device (a tap, a veth) as a port of bridge.

        NORMAL switching never forwards between two protected ports. vlans: {native, tagged}.
        """
        extra = ["protected=true"] if protected else []
        vlans = vlans or {}
        if vlans.get("native"):
            extra += [f"tag={vlans['native']}"]
            if vlans.get("tagged"):
                extra += ["vlan_mode=native-untagged", "trunks=" + ",".join(map(str, [vlans["native"], *vlans["tagged"]]))]
        elif vlans.get("tagged"):
            extra += ["vlan_mode=trunk", "trunks=" + ",".join(map(str, vlans["tagged"]))]
        self.vsctl("add-port", bridge, port, *(["--", "set", "port", port, *extra] if extra else []))

    def add_vxlan_port(self, bridge, port, remote_ip, key):
        """A VXLAN tunnel port to remote_ip with VNI key (add_vxlan_ports: many at once)."""
        # protected: NORMAL never floods from one tunnel to another (split horizon),
        # so a full mesh of tunnels between 3+ nodes has no loop
        self.vsctl("add-port", bridge, port, "--", "set", "interface", port, "type=vxlan",
                   f"options:remote_ip={remote_ip}", f"options:key={key}", "--", "set", "port", port, "protected=true")

    def add_vxlan_ports(self, bridge, tunnels, key, batch=VXLAN_BATCH):
        """add_vxlan_port for each (port, remote_ip) of tunnels, `batch` ports per ovs-vsctl
        call (one OVSDB transaction each: all of its ports are made, or none), so that a node's
        mesh of tunnels to H peers costs H/batch commands, not H."""
        tunnels = list(tunnels)
        for i in range(0, len(tunnels), batch):
            args = []
            for port, remote_ip in tunnels[i:i + batch]:
                args += [*(["--"] if args else []), "add-port", bridge, port, "--", "set", "interface", port, "type=vxlan",
                         f"options:remote_ip={remote_ip}", f"options:key={key}", "--", "set", "port", port, "protected=true"]
            self.vsctl(*args)

    def del_port(self, bridge, port):
        try:
            self.vsctl("--if-exists", "del-port", bridge, port)
        except CommandError as exc:
            if "no bridge named" not in exc.stderr:  # the bridge went first: so did its ports
                raise

    def has_bridge(self, bridge):
        """Whether OVS runs here and has this bridge (a userspace one shows as a mere tap to `ip`)."""
        try:
            return run(["ovs-vsctl", "--timeout=5", "br-exists", bridge], env=self.environ, check=False, timeout=10).returncode == 0
        except CommandError:  # no ovs-vsctl
            return False

    def bridges(self):
        return self.vsctl("list-br").split()

    def ports(self, bridge):
        return self.vsctl("list-ports", bridge).split()


class Ip:
    def __init__(self, environ=None):
        self.environ = environ

    def _ip(self, *args):
        return run(["ip", *args], env=self.environ)

    def add_tap(self, name, uid, mtu):
        """A persistent tap that uid (the VM's qemu) may attach to, up, with mtu."""
        self._ip("tuntap", "add", "dev", name, "mode", "tap", "user", str(uid))
        self._ip("link", "set", "dev", name, "mtu", str(mtu), "up")

    def del_link(self, name):
        try:
            self._ip("link", "del", "dev", name)
        except CommandError:
            if self.link_exists(name):
                raise

    def set_master(self, dev, bridge, vlans=None):
        """dev on a Linux bridge; vlans {native, tagged} replace its default VLAN (vlan_filtering bridges)."""
        self._ip("link", "set", "dev", dev, "master", bridge)
        vlans = vlans or {}
        if vlans:
            run(["bridge", "vlan", "del", "dev", dev, "vid", "1"], env=self.environ)
        if vlans.get("native"):
            run(["bridge", "vlan", "add", "dev", dev, "vid", str(vlans["native"]), "pvid", "untagged"], env=self.environ)
        for vid in vlans.get("tagged") or ():
            run(["bridge", "vlan", "add", "dev", dev, "vid", str(vid)], env=self.environ)

    def add_veth_into(self, name, peer, netns, mtu, peer_mac=None):
        """A veth pair: name here, peer inside netns (with peer_mac if given); both up with mtu."""
        mac = ["address", peer_mac] if peer_mac else []
        self._ip("link", "add", name, "mtu", str(mtu), "type", "veth", "peer", "name", peer, *mac, "mtu", str(mtu), "netns", netns)
        self._ip("link", "set", "dev", name, "up")
        self._ip("-n", netns, "link", "set", "dev", peer, "up")

    def add_netns(self, name):
        """A new namespace; a stale one of that name (its job's log lost) is replaced: names are per job."""
        if name in self.netns_names():
            self.del_netns(name)
        self._ip("netns", "add", name)
        self._ip("-n", name, "link", "set", "dev", "lo", "up")

    def del_netns(self, name):
        """Its devices go with it (veth peers included); its processes do not."""
        try:
            self._ip("netns", "del", name)
        except CommandError:
            if name in self.netns_names():
                raise

    def netns_names(self):
        return [line.split()[0] for line in self._ip("netns", "list").stdout.splitlines() if line.strip()]

    def addr_add(self, dev, cidr, netns=None):
        self._ip(*_in(netns), "addr", "add", cidr, "dev", dev)

    def route_add(self, dest, dev, via=None, netns=None):
        self._ip(*_in(netns), "route", "replace", dest, *(["via", via] if via else []), "dev", dev)

    def link_exists(self, name):
        # not /sys/class/net: a process entered into a netns with nsenter sees the host's sysfs
        return run(["ip", "link", "show", "dev", name], env=self.environ, check=False).returncode == 0


def _in(netns):
    return ["-n", netns] if netns else []


def in_netns(netns, argv):
    """argv run inside a named network namespace (nsenter: unlike `ip netns exec`, it keeps /sys)."""
    return ["nsenter", f"--net=/run/netns/{netns}", *argv] if netns else list(argv)


def sysctl(name, value, environ=None, netns=None):
    run(in_netns(netns, ["sysctl", "-q", "-w", f"{name}={value}"]), env=environ)


def tx_checksum_off(dev, environ=None, netns=None):
    """The userspace datapath forwards a veth's partial checksums unfixed: make the kernel fill them."""
    run(in_netns(netns, ["ethtool", "-K", dev, "tx", "off"]), env=environ)


class Iptables:
    """Rules in the node's tables, each tagged with its job so an admin can tell whose it is."""

    def __init__(self, environ=None, netns=None):
        self.environ, self.netns = environ, netns

    def _run(self, *args, check=True):
        # -w: wait for the xtables lock rather than fail when another job's setup holds it
        return run(in_netns(self.netns, ["iptables", "-w", "30", *args]), env=self.environ, check=check)

    def add(self, table, chain, rule, insert=False):
        self._run("-t", table, "-I" if insert else "-A", chain, *rule)

    def ensure_chain(self, table, chain, parent):
        """chain exists and parent jumps to it first; node-wide, shared by the jobs (and their node
        setups run one at a time: the node lock)."""
        if self._run("-t", table, "-n", "-L", chain, check=False).returncode != 0:
            self._run("-t", table, "-N", chain)
        if self._run("-t", table, "-C", parent, "-j", chain, check=False).returncode != 0:
            self._run("-t", table, "-I", parent, "1", "-j", chain)

    def drop_chain_if_empty(self, table, chain, parent):
        """Remove chain and parent's jump to it once no rule is left in it (the last job's undo)."""
        listed = self._run("-t", table, "-S", chain, check=False)
        if listed.returncode != 0 or any(not line.startswith("-N ") for line in listed.stdout.splitlines()):
            return  # gone already, or still used
        if self._run("-t", table, "-C", parent, "-j", chain, check=False).returncode == 0:
            self._run("-t", table, "-D", parent, "-j", chain)
        self._run("-t", table, "-X", chain)

    def delete(self, table, chain, rule):
        """Idempotent: a rule already gone is fine."""
        if self._run("-t", table, "-C", chain, *rule, check=False).returncode == 0:
            self._run("-t", table, "-D", chain, *rule)


def stop_pidfile_process(pidfile, name):
    """SIGTERM the process of pidfile if it still is `name`, wait for it; then remove the file."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/comm") as f:
            alive = f.read().strip() == name and _running(pid)
    except (OSError, ValueError, IndexError):
        alive = False
    if alive:
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.unlink(pidfile)
    except FileNotFoundError:
        pass


def _running(pid):
    """Whether pid runs: a zombie does not (a daemon's parent is init, which may reap late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def undo_actions(environ=None):
    """{kind: idempotent undo} of the objects these drivers make."""
    ovs, ip, iptables = Ovs(environ), Ip(environ), Iptables(environ)
    return {
        "ovs-bridge": lambda bridge: ovs.del_bridge(bridge),
        "ovs-port": lambda bridge, port: ovs.del_port(bridge, port),
        "tap": lambda name: ip.del_link(name),
        "link": lambda name: ip.del_link(name),
        "netns": lambda name: ip.del_netns(name),
        "iptables": lambda table, chain, rule: iptables.delete(table, chain, rule),
        "iptables-chain": lambda table, chain, parent: iptables.drop_chain_if_empty(table, chain, parent),
        "process": lambda pidfile, name: stop_pidfile_process(pidfile, name),
        "file": _unlink,
    }
