"""Host directories shared with a VM through virtio-fs, served by an unprivileged virtiofsd.

A `mount-points` entry of `type: virtio-fs` (pcocc-templates.yaml) is served by the C
virtiofsd that Debian's qemu ships (/usr/lib/qemu/virtiofsd, package qemu-system-common),
started by the VM's process, as the cluster's owner, never as root: root's virtiofsd
would let root in the guest create files of any owner on the host (a setuid-root file
is a way in). It runs in a user namespace that maps the owner's uid only (`unshare
--user --map-root-user`): whatever the guest writes belongs to the owner on the host,
and the guest's other users cannot create files there (their ids are not mapped).

virtiofsd wants a lock directory under /var/run when it makes its own socket, which an
unprivileged process cannot create: the VM's process makes the listening socket (in the
VM's private run dir) and hands it over (`--fd`). A read-only share is a read-only bind
mount of the directory in the namespace's own mount namespace (the C virtiofsd has no
read-only option). qemu reaches the daemon through a vhost-user socket and must share
the guest's memory with it (a memfd backend, share=on: see qemu.command_line).

vhost-user devices cannot be migrated: a VM with a virtio-fs share cannot be
checkpointed (lifecycle.checkpoint.unmigratable), as with 9p.
"""

import os
import shutil
import signal
import socket
import subprocess

from pcocc import procs
from pcocc.errors import PcoccError
from pcocc.fsutil import not_a_dir

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # Debian 12, qemu-system-common
START_TIMEOUT = 10  # seconds for virtiofsd to take the socket over

# run by sh inside the namespace: $1 the directory, $2 read-only (1/0), $3 the socket's fd
_INNER = ('set -e; if [ "$2" = 1 ]; then mount --bind -- "$1" "$1"; mount -o remount,bind,ro -- "$1"; fi; '
          'exec "$4" --fd="$3" -o source="$1" -o cache=auto -o sandbox=namespace -o no_xattr')


def check_sound(uid=None, gid=None, groups=None):
    """PcoccError unless an unprivileged virtiofsd can serve this user soundly (defaults: ours).

    Root: its user namespace maps root to root, so root in the guest could create setuid-root
    files on the host. A user with supplementary groups: virtiofsd drops them with setgroups(2),
    which the kernel denies in a user namespace an unprivileged user made (user_namespaces(7),
    /proc/PID/setgroups), so it cannot start. Only a user whose only group is their own passes.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    groups = os.getgroups() if groups is None else groups
    if uid == 0:
        raise PcoccError("virtio-fs is refused for root's clusters: root in the guest could create setuid-root files "
                         "on the host; use type virtio-9p")
    if set(groups) - {gid}:
        raise PcoccError("virtio-fs needs a user without supplementary groups (virtiofsd drops them, which a user "
                         "namespace denies): use type virtio-9p")


def virtiofsd_path():
    """The virtiofsd binary, or PcoccError naming the package that has it."""
    path = os.environ.get("PCOCC_VIRTIOFSD") or VIRTIOFSD
    if not os.access(path, os.X_OK):
        raise PcoccError(f"virtio-fs needs virtiofsd ({path}: not found): install qemu-system-common, or use type virtio-9p")
    if not shutil.which("unshare"):
        raise PcoccError("virtio-fs needs unshare (util-linux) to run virtiofsd in a user namespace")
    return path


class Share:
    """One virtio-fs share of a VM: its virtiofsd, and the socket qemu connects to.

    tag: the mount tag the guest names; path: the host directory; readonly: bool;
    socket_path: where to make the vhost-user socket (in the VM's run dir).
    """

    def __init__(self, tag, path, readonly, socket_path):
        self.tag, self.path, self.readonly, self.socket_path = tag, path, readonly, socket_path
        self.proc = None

    def start(self):
        """Start virtiofsd (it dies with the calling process: PR_SET_PDEATHSIG). Raises PcoccError
        when the directory is missing, virtiofsd is not installed, or it ends at once."""
        if why := not_a_dir(self.path):
            raise PcoccError(f"mount point '{self.tag}': {why}: {self.path}")
        if "," in self.path:  # virtiofsd's -o splits on commas: a path with one would add options
            raise PcoccError(f"mount point '{self.tag}': a virtio-fs path may not hold a comma: {self.path}")
        binary = virtiofsd_path()
        with _suppress_missing():
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            listener.listen(1)
            fd = listener.fileno()
            argv = ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c", _INNER, "virtiofs",
                    self.path, "1" if self.readonly else "0", str(fd), binary]
            log_path = os.path.splitext(self.socket_path)[0] + ".log"
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(fd,),
                                             start_new_session=True, **procs.dying_with_parent(signal.SIGTERM))
        finally:
            listener.close()  # virtiofsd holds its own copy
        try:
            self.proc.wait(0.2)  # a daemon that cannot start says so at once
        except subprocess.TimeoutExpired:
            return self
        raise PcoccError(f"mount point '{self.tag}': virtiofsd ended at once (status {self.proc.returncode}): {_last_line(log_path)}")

    def stop(self, timeout=5.0):
        """Stop virtiofsd (it also ends by itself once qemu disconnects)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "no message"
    except OSError:
        return "no message"


def _suppress_missing():
    import contextlib

    return contextlib.suppress(FileNotFoundError)
