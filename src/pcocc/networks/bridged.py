"""A tap per VM on an existing host bridge (a Linux bridge or an Open vSwitch bridge),
optionally on 802.1Q VLANs: `native` (the VM's untagged frames) and `tagged` ones.

The bridge belongs to the site; a job only adds and removes its taps. VLANs on a
Linux bridge need `vlan_filtering` on it (the admin's setting: we check, never change it).
"""

import hashlib

from pcocc.config.schema import F, Int, ListOf, Str, Struct
from pcocc.errors import PcoccError
from pcocc.networks import Driver, NetworkType, names, register

SETTINGS = Struct(
    {
        "host-bridge": F(Str(), required=True),
        "tap-prefix": F(Str(r"[a-zA-Z][a-zA-Z_0-9-]{0,7}", "a device prefix of up to 8 characters"), required=True),
        "mtu": F(Int(min=576, max=65535), default=1500),
        # Ours: 802.1Q VLANs on the VM's port.
        "vlans": F(
            Struct(
                {
                    "native": F(Int(min=1, max=4094)),
                    "tagged": F(ListOf(Int(min=1, max=4094))),
                }
            )
        ),
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
        ip = Ip(job.environ)
        details = run(["ip", "-d", "link", "show", "dev", bridge], env=job.environ, check=False)
        if details.returncode != 0:
            raise PcoccError(f"network '{self.network.name}': no host bridge {bridge} on {job.host}")
        is_ovs = Ovs(job.environ).has_bridge(bridge)
        if vlans and not is_ovs and "vlan_filtering 1" not in details.stdout:
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
