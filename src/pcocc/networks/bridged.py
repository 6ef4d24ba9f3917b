"""A tap per VM on an existing host bridge (a Linux bridge or an Open vSwitch bridge),
optionally on 802.1Q VLANs: `native` (the VM's untagged frames) and `tagged` ones.

The bridge belongs to the site; a job only adds and removes its taps. VLANs on a
Linux bridge need `vlan_filtering` on it (the admin's setting: we check, never change it).

`vlans` is written as the original pcocc writes it, a list of {vid, type} with type
native (the port's VLAN for untagged frames, sent untagged), tagged (carried tagged) or
untagged (sent untagged, not the port's own VLAN: a Linux bridge only), or in our mapping
form {native: VID, tagged: [VID...]}; both give the same plan {native, tagged, untagged}.
"""

import hashlib

from pcocc.config.schema import INVALID, ByKind, Enum, F, Int, ListOf, Nullable, Str, Struct
from pcocc.errors import PcoccError
from pcocc.networks import Driver, NetworkType, names, register

_VID = Int(min=1, max=4094)


class _Vlans:
    """`vlans` in either form, checked and turned into the plan {"native": VID or None,
    "tagged": [VID...], "untagged": [VID...]}; a VLAN named twice, or two native ones, is an error."""

    _shapes = ByKind(
        {
            list: ListOf(Struct({"vid": F(_VID, required=True), "type": F(Enum("native", "tagged", "untagged"), required=True)},
                                "VLAN {vid, type}")),
            dict: Struct({"native": F(Nullable(_VID)), "tagged": F(Nullable(ListOf(_VID), null=list), default=[]),
                          "untagged": F(Nullable(ListOf(_VID), null=list), default=[])}, "VLAN mapping"),
        },
        "a list of {vid, type} (or a mapping {native, tagged})",
    )

    def check(self, value, at):
        if value is None:
            return None
        checked = self._shapes.check(value, at)
        if checked is INVALID:
            return INVALID
        if isinstance(checked, list):
            natives = [v["vid"] for v in checked if v["type"] == "native"]
            if len(natives) > 1:
                return at.error(f"only one VLAN can be native, got {', '.join(map(str, natives))}")
            plan = {"native": natives[0] if natives else None,
                    "tagged": [v["vid"] for v in checked if v["type"] == "tagged"],
                    "untagged": [v["vid"] for v in checked if v["type"] == "untagged"]}
        else:
            plan = {"native": checked["native"], "tagged": list(checked["tagged"] or []), "untagged": list(checked["untagged"] or [])}
        vids = ([plan["native"]] if plan["native"] else []) + plan["tagged"] + plan["untagged"]
        twice = sorted({v for v in vids if vids.count(v) > 1})
        if twice:
            return at.error(f"VLAN {twice[0]} is listed more than once")
        return plan


SETTINGS = Struct(
    {
        "host-bridge": F(Str(), required=True),
        "tap-prefix": F(Str(r"[a-zA-Z][a-zA-Z_0-9-]{0,7}", "a device prefix of up to 8 characters"), required=True),
        "mtu": F(Int(min=576, max=65535), default=1500),
        # 802.1Q VLANs on the VM's port (pcocc-networks.yaml(5) of the original, `bridged`)
        "vlans": F(_Vlans()),
    }
)


def tap_name(settings, jobid, rank):
    return names.dev_name(settings["tap-prefix"], "", jobid, rank)


def vm_mac(jobid, rank):
    """Unique on the site's LAN without any allocation: a locally administered address from the job and rank."""
    digest = hashlib.sha1(f"pcocc:{jobid}:{rank}".encode()).digest()[:5]
    return ":".join(f"{b:02x}" for b in (0x02, *digest))


class BridgedDriver(Driver):
    def node_setup(self, job):
        from pcocc.networks.hostnet import Ip, Ovs, run

        s, jobid = self.settings, job.jobid
        bridge, vlans = s["host-bridge"], s.get("vlans") or {}
        if not any(vlans.values()):
            vlans = {}  # `vlans: []`: the bridge's default VLAN, as with no key
        ip = Ip(job.environ)
        details = run(["ip", "-d", "link", "show", "dev", bridge], env=job.environ, check=False)
        if details.returncode != 0:
            raise PcoccError(f"network '{self.network.name}': no host bridge {bridge} on {job.host}")
        is_ovs = Ovs(job.environ).has_bridge(bridge)
        if is_ovs and vlans.get("untagged"):
            raise PcoccError(f"network '{self.network.name}': bridge {bridge} on {job.host} is an Open vSwitch bridge, "
                             f"which has no 'untagged' VLAN apart from the native one; use type native or tagged")
        if any(vlans.values()) and not is_ovs and "vlan_filtering 1" not in details.stdout:
            raise PcoccError(f"network '{self.network.name}': bridge {bridge} on {job.host} needs vlan_filtering on for VLANs "
                             f"(ip link set dev {bridge} type bridge vlan_filtering 1)")
        taps = {}
        for rank in job.ranks:
            tap = taps[str(rank)] = tap_name(s, jobid, rank)
            job.undo.record(jobid, "tap", name=tap)
            ip.add_tap(tap, job.uid, s["mtu"])
            if is_ovs:
                job.undo.record(jobid, "ovs-port", bridge=bridge, port=tap)
                Ovs(job.environ).add_port(bridge, tap, vlans=vlans)
            else:
                ip.set_master(tap, bridge, vlans)  # the tap's removal takes it off the bridge
                for vid in vlans.get("untagged") or ():
                    run(["bridge", "vlan", "add", "dev", tap, "vid", str(vid), "untagged"], env=job.environ)
        return {"bridge": bridge, "taps": taps}

    def mac(self, jobid, rank):
        return vm_mac(jobid, rank)

    def nic_args(self, jobid, rank, index, nic_model):
        model = "virtio-net-pci" if nic_model == "virtio-net" else nic_model
        netdev = f"tap,id=net{index},ifname={tap_name(self.settings, jobid, rank)},script=no,downscript=no"
        device = f"{model},netdev=net{index},mac={vm_mac(jobid, rank)}"
        if self.settings["mtu"] != 1500 and model.startswith("virtio-net"):
            device += f",host_mtu={self.settings['mtu']}"
        return ["-netdev", netdev, "-device", device]


register(NetworkType("bridged", ("bridged-ethernet",), SETTINGS, "a tap on an existing host bridge", BridgedDriver))
