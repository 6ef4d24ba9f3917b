"""PCI devices handed to VMs through VFIO: which are free on this node, bind, give back.

Binding is the kernel's documented way: driver_override=vfio-pci, unbind from the
host driver, drivers_probe; then the group's /dev/vfio/<group> goes to the job's
user, whose qemu opens it. Giving back undoes it: unbind from vfio-pci, clear the
override, bind the host driver. Each step looks at the device's state first, so
it can run any number of times, also over a setup killed half-way.

Which devices are taken is read from the undo logs of this node (every job's
device is recorded there before it is bound, and node setup holds the node lock):
no other bookkeeping to get out of step with them.
"""

from pcocc.errors import PcoccError, ResourceError

VFIO = "vfio-pci"
PCI = "/sys/bus/pci"
DEVICE_KINDS = ("vfio-device", "ib-vf")  # undo kinds whose args name a device (addr) and its IOMMU group
# Drivers VFIO accepts beside vfio-pci in a group: pci-stub, and bridges (pcieport)
_GROUP_SAFE = {None, VFIO, "pci-stub", "pcieport"}


def dev(addr):
    return f"{PCI}/devices/{addr}"


def full_address(addr):
    """0000:03:00.1 for 03:00.1 (sysfs names carry the PCI domain)."""
    addr = addr.lower()
    return addr if addr.count(":") == 2 else f"0000:{addr}"


def driver(fs, addr):
    return fs.link_name(f"{dev(addr)}/driver")


def iommu_group(fs, addr):
    if not fs.exists(dev(addr)):
        raise PcoccError(f"no PCI device {addr} on this host")
    group = fs.link_name(f"{dev(addr)}/iommu_group")
    if group is None:
        raise PcoccError(f"PCI device {addr} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on)")
    return group


def check_viable(fs, addr, group):
    """qemu opens a whole IOMMU group: no other device of it may stay on a host driver."""
    for other in fs.listdir(f"/sys/kernel/iommu_groups/{group}/devices"):
        bound = driver(fs, other)
        if other != addr and bound not in _GROUP_SAFE:
            raise PcoccError(f"IOMMU group {group} of {addr} also holds {other}, bound to {bound}: "
                             "VFIO needs the whole group (unbind it, or use a slot with its own group)")


def in_use(undo):
    """(addresses, IOMMU groups) recorded by any job's undo log on this node."""
    addrs, groups = set(), set()
    for job in undo.jobs():
        for entry in undo.entries(job):
            if entry["kind"] in DEVICE_KINDS:
                addrs.add(entry["args"]["addr"])
                groups.add(entry["args"]["group"])
    return addrs, groups


def choose(fs, candidates, undo, count, what):
    """[(addr, group)] of count free candidates: recorded by no job here, not on vfio-pci
    already (someone else's), each in an IOMMU group no other VM holds."""
    addrs, groups = in_use(undo)
    free = []
    for addr in candidates:
        if addr in addrs or driver(fs, addr) == VFIO:
            continue
        group = iommu_group(fs, addr)
        if group in groups:
            continue
        groups.add(group)
        free.append((addr, group))
        if len(free) == count:
            return free
    raise ResourceError(f"{what}: {count} device(s) needed on this node, {len(free)} free of {len(candidates)}")


def bind(fs, addr, group, uid):
    """Give addr to vfio-pci and its group's device node to uid."""
    check_viable(fs, addr, group)
    fs.write(f"{dev(addr)}/driver_override", VFIO)
    current = driver(fs, addr)
    if current not in (None, VFIO):
        fs.write(f"{PCI}/drivers/{current}/unbind", addr)
    if driver(fs, addr) is None:
        fs.write(f"{PCI}/drivers_probe", addr)
    if driver(fs, addr) != VFIO:
        raise PcoccError(f"{addr} did not bind to vfio-pci (is the vfio-pci module loaded?)")
    fs.chown(f"/dev/vfio/{group}", uid)


def unbind(fs, addr):
    """Take addr from vfio-pci and clear its override (idempotent); False when the device is gone."""
    if not fs.exists(dev(addr)):
        return False  # VFs removed, device unplugged: nothing to give back
    if driver(fs, addr) == VFIO:
        fs.write(f"{PCI}/drivers/{VFIO}/unbind", addr)
    if fs.read(f"{dev(addr)}/driver_override") not in (None, "", "(null)"):
        fs.write(f"{dev(addr)}/driver_override", "\n")  # an empty line clears it
    return True


def give_back(fs, addr, host_driver):
    """Bind addr to its host driver again, if it has none (idempotent)."""
    if host_driver and fs.exists(dev(addr)) and driver(fs, addr) is None:
        fs.write(f"{PCI}/drivers/{host_driver}/bind", addr)


def release(fs, addr, host_driver):
    if unbind(fs, addr):
        give_back(fs, addr, host_driver)


def device_args(addr, index):
    """qemu's arguments for a passed-through device (the VM's index-th NIC)."""
    return ["-device", f"vfio-pci,host={addr},id=hostdev{index}"]


def vm_device(network, objects, rank):
    """The device node setup gave VM rank on this network (from the node's record)."""
    vm = ((objects or {}).get("vms") or {}).get(str(rank))
    if not vm:
        raise PcoccError(f"network '{network}': node setup recorded no device for vm{rank} on this node")
    return vm


def undo_actions(environ):
    """{kind: undo} of the objects PCI passthrough records (merged by jobnet.undo_actions)."""
    from pcocc.networks import sysfs

    fs = sysfs.open_host(environ)
    return {"vfio-device": lambda addr, host_driver, group: release(fs, addr, host_driver)}
