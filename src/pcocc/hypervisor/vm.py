"""One VM's life, as run by `pcocc internal run`: disk, seed, qemu, pinning, endpoint, stop, cleanup."""

import contextlib
import logging
import os
import subprocess
import threading
import time

from pcocc import procs
from pcocc.errors import PcoccError
from pcocc.hypervisor import qemu, seed, topology
from pcocc.hypervisor.monitor import Monitor

log = logging.getLogger("pcocc.vm")

START_TIMEOUT = 60
STOP_TIMEOUT = 30
RESTORE_TIMEOUT = 1800  # reading a large memory image back


class VM:
    """A running VM: qemu, its monitor, its guest agent channel."""

    def __init__(self, config):
        self.config = config
        self.proc = None
        self.monitor = Monitor(config.path("qmp.sock"))
        self.stopping = threading.Event()
        self.shares = []  # virtiofs.Share, started before qemu

    @property
    def qga_path(self):
        return self.config.path("qga.sock")

    def start(self, pin=True, restore_timeout=RESTORE_TIMEOUT):
        """Start qemu paused, connect QMP, pin vCPUs, restore its memory if it has some to, then let it run."""
        argv = qemu.command_line(self.config)
        log.debug("qemu: %s", " ".join(argv))
        if self.config.virtiofs:
            from pcocc.hypervisor import virtiofs

            for tag, path, readonly in self.config.virtiofs:
                self.shares.append(virtiofs.Share(tag, path, readonly, self.config.virtiofs_socket(tag)).start())
        errlog = open(self.config.path("qemu.err"), "wb")
        try:
            # qemu dies with the process that runs the VM (SIGKILLed, its task killed by SLURM):
            # nothing else knows it well enough to stop it.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, start_new_session=True,
                                         **procs.dying_with_parent())
        except FileNotFoundError:
            raise PcoccError(f"qemu binary not found: {argv[0]}") from None
        finally:
            errlog.close()
        try:
            self.monitor.connect(time.monotonic() + START_TIMEOUT, alive=lambda: self.proc.poll() is None)
        except PcoccError as exc:
            raise PcoccError(f"{self.config.name}: {exc}: {self.qemu_error()}") from None
        if pin:
            try:
                topology.pin_vcpus(self.monitor.vcpu_threads(), self.config.topology, self.proc.pid)
            except OSError as exc:  # cores outside our own affinity: keep running unpinned
                log.warning("%s: vCPU pinning failed: %s", self.config.name, exc)
        if self.config.incoming:
            from pcocc.hypervisor.snapshot import wait_migration

            try:
                wait_migration(self.monitor, restore_timeout)
            except PcoccError as exc:
                raise PcoccError(f"{self.config.name}: {exc.message}: {self.qemu_error()}") from None
        self.monitor.cmd("cont")

    def qemu_error(self):
        try:
            with open(self.config.path("qemu.err"), errors="replace") as f:
                lines = [l.strip() for l in f if l.strip() and "warning" not in l]
            return lines[-1] if lines else f"exit status {self.proc.poll()}"
        except OSError:
            return ""

    def wait(self):
        return self.proc.wait()

    def stop(self, graceful=False, timeout=STOP_TIMEOUT):
        """Stop qemu: ACPI powerdown first when graceful (persistent drives), then quit, then kill;
        then its virtio-fs daemons."""
        self.stopping.set()
        try:
            self._stop_qemu(graceful, timeout)
        finally:
            for share in self.shares:
                share.stop()

    def _stop_qemu(self, graceful, timeout):
        if self.proc is None or self.proc.poll() is not None:
            return
        if graceful:
            with contextlib.suppress(PcoccError):
                self.monitor.cmd("system_powerdown")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            with contextlib.suppress(PcoccError):
                self.monitor.cmd("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.monitor.close()


def prepare(config_kwargs, image_rev, overlay_path, seed_data, workdir, disk_from=None):
    """Build the VMConfig: overlay on the image, seed ISO, persistent drive formats.

    disk_from: a checkpoint's disk delta to start from (copied, and put on the
    image's top layer) instead of an empty overlay.
    """
    from pcocc.images.store import create_overlay, overlay_from

    cfg = qemu.VMConfig(**config_kwargs)
    if image_rev is not None:
        if not cfg.settings.get("kernel"):  # a VM that cannot boot fails now, in one line, rather than hang
            problem = image_rev.boot_problem()
            if problem:
                raise PcoccError(problem)
        cfg.disk = overlay_from(image_rev, disk_from, overlay_path) if disk_from else create_overlay(image_rev, overlay_path)
        boot = None if cfg.settings.get("kernel") else image_rev.boot_files()
        if boot:
            cfg.boot = boot
    if seed_data is not None:
        meta, user = seed_data
        cfg.seed = seed.write_iso(os.path.join(workdir, "seed.iso"), meta, user, workdir)
    return cfg


def drive_list(drives, expand):
    """[(path, cache, format)] of persistent drives, paths expanded; a missing drive is an error."""
    out = []
    for d in drives:
        path = expand(d["path"])
        if not os.path.exists(path):
            raise PcoccError(f"persistent drive not found: {path}")
        out.append((path, d["cache"], d["format"]))
    return out
