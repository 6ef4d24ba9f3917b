"""Generic PCI passthrough: each VM gets one free device of a list, through VFIO."""

from pcocc.config.schema import F, ListOf, Str, Struct
from pcocc.networks import Driver, NetworkType, register, sysfs, vfio

_PCI_ADDR = Str(r"([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", "a PCI address like 0000:03:00.1")

SETTINGS = Struct(
    {
        "host-device-addrs": F(ListOf(_PCI_ADDR), required=True),
        "host-driver": F(Str(), required=True),  # the driver the devices go back to
    }
)


class GenericPciDriver(Driver):
    migratable = False  # qemu cannot migrate a VFIO device
    uses_node_objects = True

    def node_setup(self, job):
        fs = sysfs.open_host(job.environ)
        candidates = [vfio.full_address(a) for a in self.settings["host-device-addrs"]]
        chosen = vfio.choose(fs, candidates, job.undo, len(job.ranks), f"network '{self.network.name}'")
        vms = {}
        for rank, (addr, group) in zip(job.ranks, chosen):
            job.undo.record(job.jobid, "vfio-device", addr=addr, host_driver=self.settings["host-driver"], group=group)
            vfio.bind(fs, addr, group, job.uid)
            vms[str(rank)] = {"addr": addr, "group": group}
        return {"vms": vms}

    def nic_args(self, jobid, rank, index, nic_model, objects=None):
        return vfio.device_args(vfio.vm_device(self.network.name, objects, rank)["addr"], index)


register(NetworkType("genericpci", (), SETTINGS, "PCI devices passed through with VFIO", GenericPciDriver))
