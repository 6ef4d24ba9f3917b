"""The qemu command line of a VM, from its template and its host slice."""

import os
from dataclasses import dataclass, field

from pcocc.errors import UsageError
from pcocc.hypervisor.topology import numa_args

_DISK_DEVICES = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "virtio-scsi": "scsi-hd"}


@dataclass
class VMConfig:
    name: str
    rundir: str  # sockets and logs of this VM
    settings: dict  # the resolved template values
    accel: str  # "kvm" or "tcg"
    topology: object  # topology.Topology
    disk: str = None  # the ephemeral overlay, or None
    seed: str = None  # the cloud-init ISO
    boot: tuple = None  # (kernel, initrd or None, append) for a direct kernel boot
    mounts: list = field(default_factory=list)  # [(tag, host path, readonly)] virtio-9p
    virtiofs: list = field(default_factory=list)  # [(tag, host path, readonly)] virtio-fs (hypervisor.virtiofs)
    drives: list = field(default_factory=list)  # [(path, cache, format)] persistent drives
    nics: list = field(default_factory=list)  # [list of qemu args per NIC]
    incoming: str = None  # a migration URI to restore the VM's memory from (a checkpoint)

    def path(self, name):
        return os.path.join(self.rundir, name)

    def virtiofs_socket(self, tag):
        """The vhost-user socket of virtio-fs share `tag` (virtiofsd listens, qemu connects)."""
        return self.path(f"vfs-{tag}.sock")


def _q(value):
    """A value inside a qemu option list: a comma is written twice (else it would start an option)."""
    return str(value).replace(",", ",,")


def command_line(vm):
    s = vm.settings
    topo = vm.topology
    argv = [s["qemu-bin"], "-name", vm.name, "-nodefaults", "-no-user-config", "-display", "none", "-S"]
    argv += ["-machine", f"type={s['machine-type']},accel={vm.accel}"]
    cpu = s.get("cpu-model") or ("host" if vm.accel == "kvm" else None)
    if cpu:
        argv += ["-cpu", cpu]
    argv += ["-smp", f"{topo.vcpus},sockets=1,cores={topo.vcpus},threads=1", "-m", f"{topo.memory_mb}M"]
    # virtiofsd reads and writes the guest's buffers in place: the guest memory must be shareable
    shared = bool(vm.virtiofs)
    argv += numa_args(topo, shared=shared)
    if shared and len(topo.numa) < 2:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={topo.memory_mb}M,share=on", "-machine", "memory-backend=mem"]
    # Control: QMP, serial console (qemu keeps the log), guest agent channel.
    argv += ["-qmp", f"unix:{_q(vm.path('qmp.sock'))},server=on,wait=off"]
    argv += ["-chardev", f"socket,id=console,path={_q(vm.path('console.sock'))},server=on,wait=off,logfile={_q(vm.path('console.log'))},logappend=on"]
    argv += ["-serial", "chardev:console"]
    argv += ["-device", "virtio-rng-pci"]  # guest entropy at boot: without it, ssh key generation stalls
    argv += ["-device", "virtio-serial-pci,id=vser0"]
    argv += ["-chardev", f"socket,id=qga0,path={_q(vm.path('qga.sock'))},server=on,wait=off"]
    argv += ["-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0,id=qga0port"]
    argv += _disks(vm)
    if vm.seed:
        argv += ["-drive", f"file={_q(vm.seed)},if=none,id=seed,format=raw,readonly=on", "-device", "virtio-blk-pci,drive=seed"]
    for tag, path, readonly in vm.mounts:
        argv += ["-fsdev", f"local,id=fs_{tag},path={_q(path)},security_model=none{',readonly=on' if readonly else ''}"]
        argv += ["-device", f"virtio-9p-pci,fsdev=fs_{tag},mount_tag={tag}"]
    for tag, _, _ in vm.virtiofs:
        argv += ["-chardev", f"socket,id=vfs_{tag},path={_q(vm.virtiofs_socket(tag))}"]
        argv += ["-device", f"vhost-user-fs-pci,chardev=vfs_{tag},tag={tag}"]
    for nic in vm.nics:
        argv += nic
    if s.get("remote-display") == "spice":  # its password is in a private file, never on this line (hypervisor.spice)
        from pcocc.hypervisor import spice

        argv += ["-vga", "qxl", "-object", f"secret,id={spice.SECRET_ID},format=raw,file={_q(vm.path(spice.PASSWORD_FILE))}"]
        argv += ["-spice", f"unix=on,addr={_q(vm.path(spice.SOCKET))},password-secret={spice.SECRET_ID}"]
    custom = list(s.get("custom-args") or [])
    kernel = s.get("kernel")
    if kernel:  # the template's kernel wins over the image's own
        boot = (kernel, s.get("initrd"), s.get("append") or "console=ttyS0 root=/dev/vda1")
    else:
        boot = vm.boot
    if boot and "-kernel" not in custom:
        k, initrd, append = boot
        argv += ["-kernel", k]
        if initrd:
            argv += ["-initrd", initrd]
        if "-append" not in custom:
            argv += ["-append", append]
    if vm.incoming:
        argv += ["-incoming", vm.incoming]
    return argv + custom


def _disks(vm):
    s = vm.settings
    model = s["disk-model"]
    if model not in _DISK_DEVICES:
        raise UsageError(f"unknown disk-model '{model}'")
    args = []
    if model == "virtio-scsi":
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    disks = ([(vm.disk, s["disk-cache"], "qcow2")] if vm.disk else []) + list(vm.drives)
    # a persistent drive with mmp: cluster is written by several VMs of the cluster at once (a
    # cluster file system in the guests): qemu's image locking must let them share it (share-rw)
    shared = [False] * (1 if vm.disk else 0) + [d.get("mmp") == "cluster" for d in s.get("persistent-drives") or []]
    for i, (path, cache, fmt) in enumerate(disks):
        args += ["-drive", f"file={_q(path)},if=none,id=disk{i},cache={cache},format={fmt}"]
        bus = ",bus=scsi0.0" if model == "virtio-scsi" else ""
        boot = ",bootindex=1" if i == 0 else ""
        share = ",share-rw=on" if i < len(shared) and shared[i] else ""
        args += ["-device", f"{_DISK_DEVICES[model]},drive=disk{i}{bus}{boot}{share}"]
    return args
