"""InfiniBand SR-IOV virtual functions: with PKey isolation (infiniband) or without (hostib).

Node setup gives each local VM a free VF of the host device (an mlx5 PF), with
GUIDs of its own, bound to vfio-pci; qemu gets it with -device vfio-pci. An
`infiniband` network also holds a PKey per virtual cluster (a cluster-wide pool
in the store) and publishes, per node, the GUIDs that make up the partition:
pkeyd, on the subnet manager's node, writes them into OpenSM's partitions file.
"""

from pcocc import state
from pcocc.config.schema import F, Str, Struct
from pcocc.errors import NotAvailableError, PcoccError
from pcocc.networks import Driver, NetworkType, register, sysfs, vfio

_PKEY = Str(r"0x[0-9a-fA-F]{4}", "a PKey like 0x2000")

SETTINGS = Struct(
    {
        "host-device": F(Str(), required=True),
        "min-pkey": F(_PKEY, required=True),
        "max-pkey": F(_PKEY, required=True),
        "license": F(Str()),
        "opensm-daemon": F(Str(), required=True),
        "opensm-partition-cfg": F(Str(), required=True),
        "opensm-partition-tpl": F(Str(), required=True),
    }
)

HOSTIB_SETTINGS = Struct({"host-device": F(Str(), required=True)})

PKEY_POOL = "pkey"  # one pool for every infiniband network: PKeys are unique on a fabric
IB = "/sys/class/infiniband"


# ---------------------------------------------------------------- GUIDs

def pkey_guids(pkey, rank):
    """(node GUID, port GUID) of VM rank's VF on the cluster with this PKey (upstream's scheme)."""
    return f"0xd0cc{pkey:04x}00{rank:04x}00", f"0xc0cc{pkey:04x}00{rank:04x}00"


def job_guids(jobid, rank):
    """hostib: no PKey, so the job id makes the GUIDs unique on the fabric (SLURM job ids are 32-bit)."""
    return f"0xd1cc{jobid & 0xFFFFFFFF:08x}{rank:04x}", f"0xc1cc{jobid & 0xFFFFFFFF:08x}{rank:04x}"


def colon_guid(guid):
    """0x0002c90300317e01 -> 00:02:c9:03:00:31:7e:01 (the form the sriov files take)."""
    digits = guid[2:]
    return ":".join(digits[i:i + 2] for i in range(0, 16, 2))


# ---------------------------------------------------------------- the host device

def pf_dir(device):
    return f"{IB}/{device}/device"


def vfs(fs, device):
    """[(VF index, PCI address)] of the host device's virtual functions."""
    if not fs.exists(f"{IB}/{device}"):
        raise PcoccError(f"no InfiniBand device {device} on this host (see {IB})")
    count = int(fs.read(f"{pf_dir(device)}/sriov_numvfs", "0") or 0)
    if count == 0:
        raise PcoccError(f"{device} has no SR-IOV virtual functions: set its sriov_numvfs (and NUM_OF_VFS in its firmware)")
    found = ((i, fs.link_name(f"{pf_dir(device)}/virtfn{i}")) for i in range(count))
    return [(i, addr) for i, addr in found if addr]


def host_port_guid(fs, device, port=1):
    """The port GUID of the host device: the low 64 bits of its GID 0."""
    gid = fs.read(f"{IB}/{device}/ports/{port}/gids/0")
    if not gid:
        raise PcoccError(f"cannot read the port GUID of {device} ({IB}/{device}/ports/{port}/gids/0)")
    return "0x" + "".join(gid.split(":")[4:]).lower()


def set_vf_guids(fs, device, vf, node_guid, port_guid):
    base = f"{pf_dir(device)}/sriov/{vf}"
    if not fs.exists(base):
        raise NotAvailableError(f"{device}: no {base}: only mlx5 virtual functions (ConnectX-4 and later) are supported")
    fs.write(f"{base}/policy", "Follow\n")  # the VF's port follows the physical port's state
    fs.write(f"{base}/node", colon_guid(node_guid))
    fs.write(f"{base}/port", colon_guid(port_guid))


def release_vf(fs, device, vf, addr, host_driver):
    """Undo of an ib-vf: off vfio-pci, port down (no GUID on the fabric any more), back to its host driver."""
    if not vfio.unbind(fs, addr):
        return
    if fs.exists(f"{pf_dir(device)}/sriov/{vf}/policy"):
        fs.write(f"{pf_dir(device)}/sriov/{vf}/policy", "Down\n")
    vfio.give_back(fs, addr, host_driver)


# ---------------------------------------------------------------- drivers

class HostIbDriver(Driver):
    """A VF per VM, without PKey isolation: the VM shares the host's partitions."""

    migratable = False  # qemu cannot migrate a VFIO device
    uses_node_objects = True  # nic_args needs what node setup recorded (the VF of each VM)

    def guids(self, job, rank, pkey):
        return job_guids(job.jobid, rank)

    def node_setup(self, job):
        fs = sysfs.open_host(job.environ)
        device = self.settings["host-device"]
        index = {addr: i for i, addr in vfs(fs, device)}
        chosen = vfio.choose(fs, list(index), job.undo, len(job.ranks), f"network '{self.network.name}': VFs of {device}")
        pkey = self._pkey(job)
        vms = {}
        for rank, (addr, group) in zip(job.ranks, chosen):
            node_guid, port_guid = self.guids(job, rank, pkey)
            job.undo.record(job.jobid, "ib-vf", device=device, vf=index[addr], addr=addr, host_driver=vfio.driver(fs, addr), group=group)
            set_vf_guids(fs, device, index[addr], node_guid, port_guid)
            vfio.bind(fs, addr, group, job.uid)
            vms[str(rank)] = {"addr": addr, "group": group, "node_guid": node_guid, "port_guid": port_guid}
        published = {"device": device, "vms": vms}
        if pkey is not None:
            published["pkey"] = f"0x{pkey:04x}"
            self._publish_members(job, fs, pkey, vms)
        return published

    def _pkey(self, job):
        return None

    def _publish_members(self, job, fs, pkey, vms):
        pass

    def nic_args(self, jobid, rank, index, nic_model, objects=None):
        return vfio.device_args(vfio.vm_device(self.network.name, objects, rank)["addr"], index)


class InfinibandDriver(HostIbDriver):
    """A VF per VM, and a PKey per cluster that only the cluster's VFs (and their hosts) are members of."""

    def check(self):
        low, high = int(self.settings["min-pkey"], 16), int(self.settings["max-pkey"], 16)
        if not 0 < low <= high < 0x7FFF:
            raise PcoccError(f"network '{self.network.name}': min-pkey/max-pkey must be a range within 0x0001-0x7ffe")

    def guids(self, job, rank, pkey):
        return pkey_guids(pkey, rank)

    def _pkey(self, job):
        from pcocc.allocator import Pool

        self.check()
        owner = f"{job.jobid}:{self.network.name}"
        job.undo.record(job.jobid, "pool", pool=PKEY_POOL, owner=owner, nodes=job.nodes_key, host=job.host)
        low, high = int(self.settings["min-pkey"], 16), int(self.settings["max-pkey"], 16)
        (pkey,) = Pool(job.store, PKEY_POOL, low, high).allocate(owner, alive=job.owner_alive)
        return pkey

    def _publish_members(self, job, fs, pkey, vms):
        """This node's share of the partition, for pkeyd: the host port and the VFs, full members."""
        key = state.pkey_member_key(f"0x{pkey:04x}", job.host)
        job.undo.record(job.jobid, "pkey-member", key=key)
        job.store.put(key, {"owner": f"{job.jobid}:{self.network.name}", "network": self.network.name,
                            "host_guids": [host_port_guid(fs, self.settings["host-device"])],
                            "vf_guids": [vm["port_guid"] for _, vm in sorted(vms.items(), key=lambda kv: int(kv[0]))]})


register(NetworkType("infiniband", ("ib",), SETTINGS, "InfiniBand SR-IOV with a PKey per cluster", InfinibandDriver))
register(NetworkType("hostib", ("host-infiniband",), HOSTIB_SETTINGS, "InfiniBand SR-IOV without PKey isolation", HostIbDriver))


def undo_actions(environ, store):
    """{kind: undo} of the objects InfiniBand networks record (merged by jobnet.undo_actions):
    VFs given to VMs, and the node's membership of a PKey (a store key pkeyd reads)."""
    fs = sysfs.open_host(environ)
    return {
        "ib-vf": lambda device, vf, addr, host_driver, group: release_vf(fs, device, vf, addr, host_driver),
        "pkey-member": lambda key: store.delete(key),
    }
