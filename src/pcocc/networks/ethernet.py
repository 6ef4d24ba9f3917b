"""Private Ethernet between the VMs of a cluster (Open vSwitch + VXLAN), L2 or L3.

Settings as in the original's pcocc-networks.yaml(5) (`ethernet`), plus a few of
ours; its deprecated types are read here too: `pv` as an L2 `ethernet` network,
`nat` refused (see NAT_REFUSAL).
"""

import logging

from pcocc.config.schema import INVALID, At, Bool, Enum, F, Int, Problems, Str, Struct
from pcocc.errors import PcoccError
from pcocc.networks import Driver, NetworkType, names, register

_CIDR = Str(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", "an IPv4 network like 10.200.0.0/16")

SETTINGS = Struct(
    {
        "dev-prefix": F(Str(r"[a-zA-Z][a-zA-Z_0-9]{0,7}", "a device prefix (a letter, then up to 7 letters, digits or _)"), required=True),
        "network-layer": F(Enum("L2", "L3"), default="L3"),
        "mtu": F(Int(min=576, max=65535), default=1500),
        "mac-prefix": F(Str(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){0,3}", "1 to 4 hex octets like 52:54:00"), default="52:54:00"),
        "mac-start-offset": F(Int(min=0), default=0),
        # pcocc-networks.yaml(5): appended to a node's name to find the address of its tunnel endpoint
        "host-if-suffix": F(Str(), default=""),
        "int-network": F(_CIDR, default="10.200.0.0/16"),
        "ext-network": F(_CIDR, default="10.201.0.0/16"),
        # unset: dnsmasq forwards to the resolvers of resolv-file (the host's)
        "dns-server": F(Str(r"(\d{1,3}(\.\d{1,3}){3})?", "an IPv4 address"), default=""),
        # unset: pcocc.<the node's DNS domain>, or pcocc (gateway.domain_name)
        "domain-name": F(Str(), default=""),
        "dns-search": F(Str(), default=""),
        "ntp-server": F(Str(), default=""),
        "allow-outbound": F(Enum("all", "none"), default="all"),
        "gateway": F(Enum("local-nat"), default="local-nat"),
        "manage-ip-forward": F(Bool(), default=True),
        "reverse-nat": F(
            Struct(
                {
                    "vm-port": F(Int(min=1, max=65535), required=True),
                    "min-host-port": F(Int(min=1, max=65535), required=True),
                    "max-host-port": F(Int(min=1, max=65535), required=True),
                }
            )
        ),
        # Ours: the Open vSwitch datapath: kernel 'system', userspace 'netdev', or 'auto' (datapath_type()).
        "datapath-type": F(Enum("auto", "system", "netdev"), default="auto"),
        # Ours: the resolver file whose servers the network's DNS forwards to when dns-server is unset.
        "resolv-file": F(Str(), default="/etc/resolv.conf"),
    }
)

# -- the original's deprecated types (pcocc-networks.yaml(5) of pcocc 0.x: "pv" and "nat")

DEPRECATED_TYPES = ("pv", "nat")

NAT_REFUSAL = ("the deprecated type 'nat' is not supported: it put each VM alone behind its own NAT, "
               "all with the same address and no traffic between VMs, which no network type here does; "
               "use type 'ethernet' with network-layer L3 (DHCP, DNS, NAT to the outside and reverse-nat "
               "for ssh, the VMs of a cluster on one private network)")

PV_SETTINGS = Struct(
    {
        "mac-prefix": F(Str(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){0,3}", "1 to 4 hex octets like 52:54:00"), default="52:54:00"),
        "bridge-prefix": F(Str(r"[a-zA-Z][a-zA-Z_0-9]{0,7}", "a device prefix (a letter, then up to 7 letters, digits or _)"),
                           required=True),
        "tap-prefix": F(Str(), required=True),  # our devices are all named from one prefix: not used
        "mtu": F(Int(min=576, max=65535), default=1500),
        "host-if-suffix": F(Str(), default=""),
    },
    "pv network settings",
)


def from_pv(pv):
    """The `ethernet` settings (a dict, every key set) a checked `pv` settings dict stands for:
    layer 2 only, devices named from its bridge-prefix, the same MACs, MTU and tunnel suffix."""
    out = SETTINGS.check({"dev-prefix": pv["bridge-prefix"], "network-layer": "L2", "mac-prefix": pv["mac-prefix"],
                          "mtu": pv["mtu"], "host-if-suffix": pv["host-if-suffix"]}, At("(pv)", 0, "", Problems()))
    assert out is not INVALID  # every value was checked by PV_SETTINGS
    return out

VNI_POOL = ("vxlan", 1000, 16_000_000)  # cluster-wide VXLAN ids; below 1000 left to the site


def bridge_name(settings, jobid):
    return names.dev_name(settings["dev-prefix"], "b", jobid)


def tap_name(settings, jobid, rank):
    """The tap of VM `rank` (node setup makes it, the VM's qemu opens it)."""
    return names.dev_name(settings["dev-prefix"], "t", jobid, rank)


def tunnel_port_name(settings, jobid, peer_index):
    return names.dev_name(settings["dev-prefix"], "x", jobid, peer_index)


def vm_mac(settings, rank):
    try:
        return names.mac_address(settings["mac-prefix"], rank, settings["mac-start-offset"])
    except ValueError as exc:
        raise PcoccError(str(exc)) from None


def datapath_type(settings, kernel_has_it=None):
    """The Open vSwitch datapath of a network: its `datapath-type`, or for `auto` (the default,
    so that a network written with the original's keys works on any node) what
    hostnet.ovs_datapath() finds in this kernel."""
    from pcocc.networks.hostnet import ovs_datapath

    return ovs_datapath(settings["datapath-type"], kernel_has_it)


class EthernetDriver(Driver):
    """One OVS bridge per job and node, a tap per local VM, a VXLAN tunnel to each
    other node of the job with the job's VNI. NORMAL switching is enough: each job has
    its own bridge and VNI, so no frame of a job, ARP included, reaches another job.
    L3 adds the job's gateway on each node (gateway.py)."""

    needs_peers = True

    def check(self):
        if self.settings["network-layer"] == "L3":
            from pcocc.networks.gateway import Addressing

            Addressing(self.settings, self.network.name)  # a clear error for networks too small

    def node_setup(self, job):
        from pcocc.allocator import Pool
        from pcocc.networks.hostnet import Ip, Ovs

        self.check()
        s, jobid = self.settings, job.jobid
        ovs, ip = Ovs(job.environ), Ip(job.environ)
        owner = f"{jobid}:{self.network.name}"
        job.undo.record(jobid, "pool", pool=VNI_POOL[0], owner=owner, nodes=job.nodes_key, host=job.host)
        (vni,) = Pool(job.store, *VNI_POOL).allocate(owner, alive=job.owner_alive)
        bridge = bridge_name(s, jobid)
        datapath = datapath_type(s)
        if datapath != s["datapath-type"]:
            logging.getLogger("pcocc.setup").info("network '%s': Open vSwitch's %s datapath (datapath-type: auto)",
                                                  self.network.name, datapath)
        job.undo.record(jobid, "ovs-bridge", bridge=bridge)
        ovs.add_bridge(bridge, datapath)
        for rank in job.ranks:
            tap = tap_name(s, jobid, rank)
            job.undo.record(jobid, "tap", name=tap)
            ip.add_tap(tap, job.uid, s["mtu"])
            job.undo.record(jobid, "ovs-port", bridge=bridge, port=tap)  # undone first: OVS lets go of the tap
            ovs.add_port(bridge, tap)
        # the mesh: a tunnel to each peer, all recorded, then made in a few ovs-vsctl calls (not one per peer)
        tunnels = [(tunnel_port_name(s, jobid, index), job.peers[host]) for index, host in enumerate(job.nodes) if host in job.peers]
        for port, _ in tunnels:
            job.undo.record(jobid, "ovs-port", bridge=bridge, port=port)
        ovs.add_vxlan_ports(bridge, tunnels, vni)
        made = {"bridge": bridge, "vni": vni}
        if s["network-layer"] == "L3":
            from pcocc.networks import gateway

            made.update(gateway.setup(job, self.network, bridge, lambda rank: vm_mac(s, rank)))
        return made

    def mac(self, jobid, rank):
        return vm_mac(self.settings, rank)

    def nic_args(self, jobid, rank, index, nic_model):
        self.check()
        s = self.settings
        model = "virtio-net-pci" if nic_model == "virtio-net" else nic_model
        netdev = f"tap,id=net{index},ifname={tap_name(s, jobid, rank)},script=no,downscript=no"
        if datapath_type(s) == "netdev":
            netdev += ",vnet_hdr=off"  # the userspace datapath forwards partial checksums unfixed: TCP would fail
        device = f"{model},netdev=net{index},mac={vm_mac(s, rank)}"
        if s["mtu"] != 1500 and model.startswith("virtio-net"):
            from pcocc.networks.gateway import vm_mtu

            device += f",host_mtu={vm_mtu(s)}"  # the guest learns its MTU from the device, room left for VXLAN
        return ["-netdev", netdev, "-device", device]


register(NetworkType("ethernet", ("eth",), SETTINGS, "private Ethernet over Open vSwitch and VXLAN", EthernetDriver))
