"""A simulated node kernel for the VFIO and InfiniBand drivers: a sysfs tree in files,
and a small model of what the kernel does when they write to it.

The tree has the real layout (a SIMULATION, not hardware): PCI devices under
sys/devices/pci0000:00 with sys/bus/pci/devices symlinks, drivers with their
bind/unbind/new_id files and device links, IOMMU groups, an mlx5 physical
function with sriov_numvfs, virtfnN links and sriov/N/{policy,node,port}, its
InfiniBand class entry, and /dev/vfio nodes. The drivers under test read it with
plain file operations; their writes go through HostFs.write, which this class
overrides to apply the kernel's effects (and refusals, with the kernel's errno):

  drivers/D/unbind ADDR     ENODEV unless ADDR is bound to D; unbinds
  drivers/D/bind ADDR       EBUSY if bound; ENODEV unless D matches (driver_override,
                            else D's ids); binds
  drivers/D/new_id "V D"    adds an id to D, binds the unbound devices it matches
  drivers_probe ADDR        binds an unbound device to its override, else to a
                            driver whose ids match; nothing when none does
  devices/A/driver_override an empty line clears it
  sriov/N/policy|node|port  Follow/Down/Up; GUIDs as xx:xx:xx:xx:xx:xx:xx:xx (EINVAL otherwise)

A device bound to vfio-pci makes /dev/vfio/<group> appear (root, 0600); it goes
when no device of the group is left on vfio-pci. Writes to a missing attribute
fail with ENOENT, as sysfs attributes cannot be created.
"""

import errno
import os
import re
import threading

from pcocc.networks.sysfs import HostFs

MLX = "15b3"
PF_ID, VF_ID = "101b", "101c"  # ConnectX-6 and its virtual function
DEVICES = "sys/devices/pci0000:00"
_GUID = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){7}")


class SimulatedHost(HostFs):
    def __init__(self, root, ib_device="mlx5_0", vfs=8, bus=3, port_guid="0002:c903:0031:7e01", autoprobe=True):
        super().__init__(str(root))
        self.lock = threading.RLock()
        self.ids = {}  # driver -> {(vendor, device)}
        self.writes = []  # (path as written, value), in order
        self.ib_device = ib_device
        for sub in ("sys/bus/pci/devices", "sys/kernel/iommu_groups", "dev/vfio", DEVICES, "sys/class/infiniband"):
            os.makedirs(self._p(sub), exist_ok=True)
        _touch(self._p("sys/bus/pci/drivers_probe"))
        _touch(self._p("dev/vfio/vfio"))
        self.add_driver("mlx5_core", {(MLX, PF_ID), (MLX, VF_ID)})
        self.add_driver("vfio-pci", set())
        self.add_driver("pci-stub", set())
        self.pf = f"0000:{bus:02x}:00.0"
        self.add_device(self.pf, MLX, PF_ID, group=f"{bus}0", driver="mlx5_core")
        pf_dir = self._p(f"{DEVICES}/{self.pf}")
        _write(os.path.join(pf_dir, "sriov_totalvfs"), "64")
        _write(os.path.join(pf_dir, "sriov_numvfs"), str(vfs))
        self.vfs = []
        for i in range(vfs):
            fn = i + 1
            addr = f"0000:{bus:02x}:{fn // 8:02x}.{fn % 8}"
            self.add_device(addr, MLX, VF_ID, group=f"{bus}{fn:02d}", driver="mlx5_core" if autoprobe else None)
            os.symlink(f"../{addr}", os.path.join(pf_dir, f"virtfn{i}"))
            sriov = os.path.join(pf_dir, "sriov", str(i))
            os.makedirs(sriov)
            _write(os.path.join(sriov, "policy"), "Down")
            _write(os.path.join(sriov, "node"), "00:00:00:00:00:00:00:00")
            _write(os.path.join(sriov, "port"), "00:00:00:00:00:00:00:00")
            self.vfs.append(addr)
        ib = self._p(f"sys/class/infiniband/{ib_device}")
        os.makedirs(os.path.join(ib, "ports/1/gids"))
        os.symlink(os.path.relpath(pf_dir, ib), os.path.join(ib, "device"))
        _write(os.path.join(ib, "ports/1/gids/0"), f"fe80:0000:0000:0000:{port_guid}")
        self.port_guid = "0x" + port_guid.replace(":", "")

    # ------------------------------------------------------------ building the tree

    def _p(self, rel):
        return os.path.join(self.root, rel)

    def add_driver(self, name, ids):
        d = self._p(f"sys/bus/pci/drivers/{name}")
        os.makedirs(d, exist_ok=True)
        for f in ("bind", "unbind", "new_id"):
            _touch(os.path.join(d, f))
        self.ids[name] = set(ids)

    def add_device(self, addr, vendor, device, group, driver=None):
        d = self._p(f"{DEVICES}/{addr}")
        os.makedirs(d)
        _write(os.path.join(d, "vendor"), f"0x{vendor}")
        _write(os.path.join(d, "device"), f"0x{device}")
        _write(os.path.join(d, "driver_override"), "(null)")
        os.symlink(f"../../../devices/pci0000:00/{addr}", self._p(f"sys/bus/pci/devices/{addr}"))
        gdir = self._p(f"sys/kernel/iommu_groups/{group}/devices")
        os.makedirs(gdir, exist_ok=True)
        os.symlink(f"../../../../devices/pci0000:00/{addr}", os.path.join(gdir, addr))
        os.symlink(f"../../../kernel/iommu_groups/{group}", os.path.join(d, "iommu_group"))
        if driver:
            self._attach(addr, driver)

    # ------------------------------------------------------------ what tests look at

    def driver(self, addr):
        link = self._p(f"{DEVICES}/{addr}/driver")
        return os.path.basename(os.readlink(link)) if os.path.islink(link) else None

    def group(self, addr):
        return os.path.basename(os.readlink(self._p(f"{DEVICES}/{addr}/iommu_group")))

    def override(self, addr):
        return _read(self._p(f"{DEVICES}/{addr}/driver_override"))

    def vf_guids(self, index):
        base = self._p(f"{DEVICES}/{self.pf}/sriov/{index}")
        return {f: _read(os.path.join(base, f)) for f in ("policy", "node", "port")}

    def vfio_nodes(self):
        return sorted(n for n in os.listdir(self._p("dev/vfio")) if n != "vfio")

    def on_vfio(self):
        return sorted(a for a in self.vfs if self.driver(a) == "vfio-pci")

    # ------------------------------------------------------------ the kernel's side of a write

    def write(self, path, value):
        with self.lock:
            full = self.path(path)
            if not os.path.isfile(full):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            self.writes.append((path, value))
            real = os.path.relpath(os.path.realpath(full), os.path.realpath(self.root))
            if not self._effect(real, value.strip()):
                _write(full, value.strip())

    def _effect(self, real, value):
        m = re.fullmatch(r"sys/bus/pci/drivers/([^/]+)/(bind|unbind|new_id)", real)
        if m:
            getattr(self, f"_{m.group(2)}")(m.group(1), value)
            return True
        if real == "sys/bus/pci/drivers_probe":
            self._probe(value)
            return True
        m = re.fullmatch(rf"{DEVICES}/([^/]+)/driver_override", real)
        if m:
            _write(self._p(real), value or "(null)")
            return True
        m = re.fullmatch(rf"{DEVICES}/[^/]+/sriov/\d+/(policy|node|port)", real)
        if m:
            ok = value in ("Follow", "Down", "Up") if m.group(1) == "policy" else bool(_GUID.fullmatch(value))
            if not ok:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), real)
            return False  # stored as written
        if real.endswith("/sriov_numvfs"):
            raise OSError(errno.EBUSY, "VFs in use: the simulation does not change sriov_numvfs", real)
        return False

    def _exists(self, addr):
        if not os.path.isdir(self._p(f"{DEVICES}/{addr}")):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), addr)

    def _matches(self, drv, addr):
        override = self.override(addr)
        if override != "(null)":
            return override == drv
        ident = (_read(self._p(f"{DEVICES}/{addr}/vendor"))[2:], _read(self._p(f"{DEVICES}/{addr}/device"))[2:])
        return ident in self.ids.get(drv, ())

    def _unbind(self, drv, addr):
        self._exists(addr)
        if self.driver(addr) != drv:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), addr)
        self._detach(addr)

    def _bind(self, drv, addr):
        self._exists(addr)
        if self.driver(addr) is not None:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), addr)
        if not self._matches(drv, addr):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), addr)
        self._attach(addr, drv)

    def _new_id(self, drv, value):
        vendor, device = value.split()[:2]
        self.ids[drv].add((vendor.lower().removeprefix("0x"), device.lower().removeprefix("0x")))
        for addr in os.listdir(self._p(DEVICES)):
            if self.driver(addr) is None and self._matches(drv, addr):
                self._attach(addr, drv)

    def _probe(self, addr):
        self._exists(addr)
        if self.driver(addr) is not None:
            return
        for drv in sorted(self.ids):
            if self._matches(drv, addr):
                self._attach(addr, drv)
                return

    def _attach(self, addr, drv):
        os.symlink(f"../../../bus/pci/drivers/{drv}", self._p(f"{DEVICES}/{addr}/driver"))
        os.symlink(f"../../../../devices/pci0000:00/{addr}", self._p(f"sys/bus/pci/drivers/{drv}/{addr}"))
        if drv == "vfio-pci":
            node = self._p(f"dev/vfio/{self.group(addr)}")
            if not os.path.exists(node):
                _touch(node)
                os.chmod(node, 0o600)
                os.chown(node, 0, 0)

    def _detach(self, addr):
        drv = self.driver(addr)
        os.unlink(self._p(f"{DEVICES}/{addr}/driver"))
        os.unlink(self._p(f"sys/bus/pci/drivers/{drv}/{addr}"))
        if drv == "vfio-pci":
            group = self.group(addr)
            members = os.listdir(self._p(f"sys/kernel/iommu_groups/{group}/devices"))
            if not any(self.driver(a) == "vfio-pci" for a in members):
                os.unlink(self._p(f"dev/vfio/{group}"))


def _touch(path):
    open(path, "a").close()


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _read(path):
    with open(path) as f:
        return f.read().strip()
