"""The tiny guest image, booted under TCG: NoCloud seed, guest agent, cache."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pcocc.agent.qga import GuestAgent
from pcocc.images.build import build_image, verify_cache_entry
from pcocc.runner import run

QEMU = "qemu-system-x86_64"
HOSTNAME = "tinyvm-test0"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFd3b1V0bHqbbNrO4YFyQ2B3k9CZqNh1v8F0u1r2Yx7a pcocc-test"
MARKER = "/root/runcmd-marker"
BOOT_TIMEOUT = 180  # seconds; TCG on a loaded 2-core host

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)"),
]

USER_DATA = f"""#cloud-config
hostname: {HOSTNAME}
ssh_authorized_keys:
  - {SSH_KEY}
runcmd:
  - echo "runcmd ran as $(id -un)" > {MARKER}
  - [sh, -c, "echo list form >> {MARKER}"]
write_files:
  - path: /etc/pcocc-test.conf
    permissions: '0640'
    content: |
      key: value
mounts:
  - [hostshare, /mnt/host, 9p, "trans=virtio,version=9p2000.L"]
"""


def _free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TinyVM:
    """One qemu TCG VM of the tiny image: overlay, seed ISO, agent socket, console log."""

    def __init__(self, image, kernel):
        self.image = image
        self.kernel = kernel
        self.dir = Path(tempfile.mkdtemp(prefix="pcocc-tiny-"))  # short: unix socket paths
        self.qga_sock = self.dir / "qga.sock"
        self.boots = 0
        self.console = None
        self.proc = None
        self.agent = None
        self.agent_after = None
        self.ready_after = None

    def _prepare(self):
        overlay, seed, share = self.dir / "overlay.qcow2", self.dir / "seed", self.dir / "share"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.image.disk, "-F", "qcow2", overlay])
        seed.mkdir()
        (seed / "meta-data").write_text(f"instance-id: iid-{os.getpid()}-{time.time_ns()}\nlocal-hostname: not-this-one\n")
        (seed / "user-data").write_text(USER_DATA)
        run(["genisoimage", "-quiet", "-o", self.dir / "seed.iso", "-V", "cidata", "-J", "-r", seed])
        share.mkdir()
        (share / "hello.txt").write_text("from the host\n")

    def start(self):
        """Boot (again, on the same overlay and seed, after a power off); wait for the agent and READY."""
        if self.boots == 0:
            self._prepare()
        self.boots += 1
        self.console = self.dir / f"console{self.boots}.log"
        argv = [
            QEMU, "-accel", "tcg", "-M", "pc", "-m", "256", "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", self.kernel, "-initrd", self.image.initrd, "-append", f"{self.image.append} pcocc.netwait=1",
            "-drive", f"file={self.dir / 'overlay.qcow2'},if=virtio,format=qcow2,cache=unsafe",
            "-drive", f"file={self.dir / 'seed.iso'},if=virtio,format=raw,readonly=on",
            "-chardev", f"socket,id=qga0,path={self.qga_sock},server=on,wait=off",
            "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-device", "virtio-rng-pci",
            "-virtfs", f"local,path={self.dir / 'share'},mount_tag=hostshare,security_model=none,id=share0",
            # a NIC whose packets go nowhere: DHCP must not hold the boot
            "-netdev", f"socket,id=n0,udp=127.0.0.1:{_free_udp_port()},localaddr=127.0.0.1:{_free_udp_port()}",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.console}",
        ]  # fmt: skip
        if self.agent:
            self.agent.close()
        started = time.monotonic()
        self.proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.agent = GuestAgent(self.qga_sock, timeout=30)
        deadline = started + BOOT_TIMEOUT
        self.agent.connect(deadline)
        self.agent_after = time.monotonic() - started
        while "PCOCC-READY" not in self.console_text():
            assert self.proc.poll() is None, f"qemu exited ({self.proc.returncode}): {self.proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, f"no PCOCC-READY in {BOOT_TIMEOUT} s; console:\n{self.console_text()}"
            time.sleep(0.05)
        self.ready_after = time.monotonic() - started
        return self

    def console_text(self):
        try:
            return self.console.read_text(errors="replace") if self.console else ""
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.agent:
            self.agent.close()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(30)
            self.proc.stdout.close()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _report(capsys, line):
    with capsys.disabled():
        print(f"\n  {line}", flush=True)


@pytest.fixture(scope="module")
def vm(tiny_image):
    machine = TinyVM(tiny_image, tiny_image.vmlinux or tiny_image.kernel)
    try:
        yield machine.start()
    finally:
        machine.stop()


def test_boot_prints_ready_with_the_seed_hostname(vm, capsys):
    assert f"PCOCC-READY {HOSTNAME}" in vm.console_text()
    assert "user-data:" not in vm.console_text()  # no parse warnings
    kind = "uncompressed PVH vmlinux" if vm.kernel == vm.image.vmlinux else "bzImage"
    _report(capsys, f"TCG boot ({kind}): guest agent answered {vm.agent_after:.2f} s after qemu started, PCOCC-READY after {vm.ready_after:.2f} s")


def test_agent_answers_ping(vm):
    vm.agent.ping()


def test_exec_hostname_gives_the_seed_hostname(vm):
    code, out, err = vm.agent.exec(["hostname"])
    assert (code, out.decode().strip()) == (0, HOSTNAME), err


def test_exec_returns_the_exit_code(vm):
    assert vm.agent.exec(["sh", "-c", "exit 3"])[0] == 3


def test_runcmd_ran(vm):
    assert vm.agent.read_file(MARKER).decode() == "runcmd ran as root\nlist form\n"


def test_write_files_and_ssh_keys_applied(vm):
    assert vm.agent.read_file("/etc/pcocc-test.conf") == b"key: value\n"
    assert vm.agent.exec(["stat", "-c", "%a", "/etc/pcocc-test.conf"])[1].strip() == b"640"
    assert SSH_KEY in vm.agent.read_file("/root/.ssh/authorized_keys").decode().splitlines()


def test_mounts_mounted_the_9p_share(vm):
    assert vm.agent.read_file("/mnt/host/hello.txt") == b"from the host\n"


def test_services_run(vm):
    code, out, _ = vm.agent.exec(["ps", "-o", "args"])
    procs = out.decode()
    for daemon in ("dropbear", "qemu-ga", "udhcpc"):
        assert daemon in procs, procs
    listening = vm.agent.read_file("/proc/net/tcp").decode()
    assert any(line.split()[1].endswith(":0016") and line.split()[3] == "0A" for line in listening.splitlines()[1:]), listening


def test_write_file_then_read_file(vm):
    data = bytes(range(256)) * 1000
    vm.agent.write_file("/tmp/roundtrip.bin", data, mode=0o600)
    assert vm.agent.read_file("/tmp/roundtrip.bin") == data
    assert vm.agent.exec(["stat", "-c", "%a", "/tmp/roundtrip.bin"])[1].strip() == b"600"


def test_fsfreeze_then_thaw(vm):
    assert vm.agent.fsfreeze_status() == "thawed"
    try:
        assert vm.agent.fsfreeze() >= 1
        assert vm.agent.fsfreeze_status() == "frozen"
    finally:
        thawed = vm.agent.fsthaw()
    assert thawed >= 1
    assert vm.agent.fsfreeze_status() == "thawed"
    assert vm.agent.exec(["sh", "-c", "echo after > /root/after-thaw && sync"])[0] == 0


def test_guest_shutdown_powers_off_and_a_second_boot_keeps_the_instance(vm):
    vm.agent.write_file("/root/before-poweroff", b"kept\n")
    vm.agent.shutdown()  # qemu-ga runs /sbin/shutdown, which sends SIGTERM to pcocc-init
    assert vm.proc.wait(60) == 0
    assert "pcocc-init: poweroff" in vm.console_text()
    vm.start()  # same overlay, same seed: the same instance
    assert f"PCOCC-READY {HOSTNAME}" in vm.console_text()
    assert vm.agent.exec(["hostname"])[1].strip() == HOSTNAME.encode()
    assert vm.agent.read_file("/root/before-poweroff") == b"kept\n"
    assert vm.agent.read_file(MARKER).decode() == "runcmd ran as root\nlist form\n"  # not run again


def test_bzimage_kernel_boots(tiny_image, capsys):
    machine = TinyVM(tiny_image, tiny_image.kernel)
    try:
        machine.start()
        machine.agent.ping()
        _report(capsys, f"TCG boot (bzImage): guest agent answered after {machine.agent_after:.2f} s, PCOCC-READY after {machine.ready_after:.2f} s")
    finally:
        machine.stop()


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_second_build_is_a_cache_hit(tiny_image, tmp_path, capsys):
    started = time.monotonic()
    cache_dir = tiny_image.disk.parent.parent
    again = build_image("tiny", tmp_path / "out", cache_dir, log=lambda line: None)
    elapsed = time.monotonic() - started
    assert again.cached
    assert again.key == tiny_image.key
    manifest = json.loads((tiny_image.disk.parent / "manifest.json").read_text())
    for mine, cached in ((again.disk, tiny_image.disk), (again.kernel, tiny_image.kernel), (again.initrd, tiny_image.initrd)):
        assert mine.parent == tmp_path / "out"
        assert _sha256(mine) == _sha256(cached) == manifest["sha256"][cached.name]
    _report(capsys, f"cached build_image('tiny'): {elapsed:.2f} s (disk {tiny_image.disk.stat().st_size / 2**20:.0f} MiB)")


def test_a_corrupted_cache_entry_is_detected(tiny_image, tmp_path):
    entry = tmp_path / tiny_image.disk.parent.name
    shutil.copytree(tiny_image.disk.parent, entry)
    assert verify_cache_entry(entry, tiny_image.key)[0] is not None
    initrd = entry / tiny_image.initrd.name
    initrd.chmod(0o644)
    with open(initrd, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    manifest, why = verify_cache_entry(entry, tiny_image.key)
    assert manifest is None and "initrd" in why
    assert verify_cache_entry(entry, "another key")[0] is None
