"""Choose the accelerator: KVM when a real guest kernel runs under it, else TCG.

/dev/kvm may open and still hang (nested KVM on some hosts: a boot sector,
even one entering long mode, runs, while a Linux kernel never prints a line).
So the probe starts a Linux kernel under KVM and waits, with a short deadline,
for its first line on the serial console. Without a kernel to try, it falls
back to a boot sector that exits through the isa-debug-exit port. The answer
is cached per boot of the host.
"""

import json
import os
import stat
import subprocess
import time

from pcocc import procs

PROBE_TIMEOUT = 4.0
PROBE_OUTPUT_MAX = 1 << 20  # of the probe's console kept: its first lines are what it looks for
# mov al, 1; out 0xf4, al; hlt  -> qemu exits with status (1 << 1) | 1 = 3
_BOOT_SECTOR = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4]).ljust(510, b"\0") + b"\x55\xaa"


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _run_until(argv, done, timeout, pass_fds=()):
    """Runs argv until done(output so far) is true (True), it exits (its status), or timeout
    (None). Its stdout (the probe's serial console) is read as it comes, never to a file."""
    # A probe under a KVM that hangs never ends by itself: it dies with its parent, however that ends.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            pass_fds=pass_fds, **procs.dying_with_parent())
    os.set_blocking(proc.stdout.fileno(), False)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            status = proc.poll()  # before the read: what an exited probe printed is all read
            try:
                while len(output) < PROBE_OUTPUT_MAX:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    output += chunk
            except BlockingIOError:
                pass
            if done(output):
                return True
            if status is not None:
                return status
            time.sleep(0.02)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def probe_kvm(qemu_bin="qemu-system-x86_64", kernel=None, timeout=PROBE_TIMEOUT):
    """Whether a VM runs under KVM here (False when /dev/kvm is absent, unusable or hangs).

    The probe writes no file: its serial console is a pipe and the boot sector a memfd, so a
    probe killed half-way (SIGKILL of the VM process) leaves nothing behind.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    # 256 MiB: in less, a Debian kernel panics before its console is up, and what it printed
    # is lost with qemu's exit (measured: -m 64 showed no line on the pipe)
    base = [qemu_bin, "-accel", "kvm", "-M", "pc", "-m", "256", "-nodefaults", "-display", "none", "-no-reboot"]
    if kernel:
        argv = base + ["-kernel", kernel, "-append", "console=ttyS0 panic=-1", "-serial", "stdio"]
        return _run_until(argv, lambda out: b"Linux version" in out, timeout) is True
    fd = os.memfd_create("pcocc-probe-boot")
    try:
        os.write(fd, _BOOT_SECTOR)
        argv = base + ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                       "-drive", f"file=/dev/fd/{fd},format=raw,if=ide"]
        return _run_until(argv, lambda out: False, timeout, pass_fds=(fd,)) == 3
    finally:
        os.close(fd)


def host_kernel():
    """A kernel to probe with when the image has none: the host's own, if readable."""
    for name in sorted(os.listdir("/boot"), reverse=True) if os.path.isdir("/boot") else []:
        path = os.path.join("/boot", name)
        if name.startswith("vmlinuz") and os.access(path, os.R_OK):
            return path
    return None


def choose(cache_dir, qemu_bin="qemu-system-x86_64", kernel=None, forced=None):
    """'kvm' or 'tcg'. forced (e.g. from PCOCC_ACCEL) skips the probe.

    The answer is cached in cache_dir/pcocc-accel.json for this boot of the
    host, only when cache_dir is a private directory of ours (fsutil: owner,
    mode 0700, not a link; the caller gives the user's run directory, never
    /tmp itself). The cache is read with O_NOFOLLOW and written under a random
    name with O_EXCL|O_NOFOLLOW, then renamed: a link planted by another user
    is never followed.
    """
    if forced in ("kvm", "tcg"):
        return forced
    from pcocc.fsutil import is_private_dir, write_private

    private = is_private_dir(cache_dir)
    cache = os.path.join(cache_dir, "pcocc-accel.json")
    boot = _boot_id()
    if private:
        try:
            fd = os.open(cache, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                mine = st.st_uid == os.geteuid() and stat.S_ISREG(st.st_mode)
                cached = json.loads(f.read(4096)) if mine else {}
            if cached.get("boot_id") == boot and cached.get("qemu") == qemu_bin and cached.get("accel") in ("kvm", "tcg"):
                return cached["accel"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    accel = "kvm" if probe_kvm(qemu_bin, kernel or host_kernel()) else "tcg"
    if private:
        try:
            write_private(cache, json.dumps({"boot_id": boot, "qemu": qemu_bin, "accel": accel}).encode())
        except OSError:
            pass
    return accel
