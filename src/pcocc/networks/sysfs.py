"""The host's kernel files (sysfs, /dev/vfio) and the subnet manager's files, under one root.

Every path the VFIO and InfiniBand drivers touch goes through HostFs, rooted at
$PCOCC_HOST_ROOT (default "/"): tests point it at a simulated tree. Writes are
the one way the drivers act on the kernel (unbind, bind, driver_override, VF
GUIDs); they open the attribute without O_CREAT, as sysfs attributes cannot be
created, so a missing attribute fails loudly instead of leaving a stray file.
"""

import os
import time

from pcocc.errors import PcoccError

ROOT_ENV = "PCOCC_HOST_ROOT"


def host_root(environ):
    return (environ or {}).get(ROOT_ENV) or "/"


def open_host(environ):
    """The HostFs of this node (tests replace this function by a simulation)."""
    return HostFs(host_root(environ))


class HostFs:
    def __init__(self, root="/"):
        self.root = root

    def path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def exists(self, path):
        return os.path.lexists(self.path(path))

    def read(self, path, default=None):
        try:
            with open(self.path(path)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return default

    def write(self, path, value):
        """Write a kernel attribute (the kernel acts on it); OSError as the kernel refuses."""
        fd = os.open(self.path(path), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def link_name(self, path):
        """The last component of a symlink's target (a driver, an IOMMU group), or None."""
        try:
            return os.path.basename(os.readlink(self.path(path)))
        except (FileNotFoundError, OSError):
            return None

    def listdir(self, path):
        try:
            return sorted(os.listdir(self.path(path)))
        except FileNotFoundError:
            return []

    def chown(self, path, uid, timeout=5.0):
        """chown a device node, waiting for it to appear (devtmpfs/udev make it just after the bind)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path(path)):
            if time.monotonic() >= deadline:
                raise PcoccError(f"{path} did not appear within {timeout} s")
            time.sleep(0.05)
        os.chown(self.path(path), uid, -1)
