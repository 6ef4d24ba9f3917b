"""pcocc cp against a real VM (local backend, qemu under TCG, the stock qemu-guest-agent of the
tiny image, 256 MiB of RAM): a 20 MiB file both ways whole, a directory tree, errors."""

import hashlib
import os
import subprocess

import pytest

from local_site import PCOCC, LocalSite

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cp-cluster")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_image):
    """Two 256 MiB VMs shared by the tests of this module."""
    site = LocalSite(tmp_path_factory.mktemp("cp"), tiny_image)
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    try:
        r = site.pcocc("batch", "-m", "256", "-J", "cp", "--wait", "tiny:2")
        assert r.returncode == 0, r.stderr
        site.jobid = r.stdout.strip()
        yield site
    finally:
        site.cleanup()


def cp(site, *argv):
    r = subprocess.run([str(PCOCC), "cp", "-j", site.jobid, *argv], env=site.environ, stdin=subprocess.DEVNULL,
                       capture_output=True, cwd=site.root, timeout=900)
    return r.returncode, r.stdout, r.stderr


def in_vm(site, command, vm="vm0"):
    r = site.pcocc("exec", "-j", site.jobid, "-n", "-w", vm, command)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_20_mib_file_goes_up_and_back_whole(cluster, tmp_path):
    data = os.urandom(20 * 1024 * 1024)
    src = tmp_path / "big"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert cp(cluster, str(src), "vm0:/root/big") == (0, b"", b"")
    assert in_vm(cluster, "sha256sum /root/big").split()[0] == digest
    back = tmp_path / "back"
    assert cp(cluster, "vm0:/root/big", str(back)) == (0, b"", b"")
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    in_vm(cluster, "rm /root/big")


def test_a_tree_goes_to_two_vms_and_back(cluster, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"A\n")
    (src / "sub" / "b b").write_bytes(os.urandom(70000))
    assert cp(cluster, "-r", str(src), "vm[0-1]:/root/") == (0, b"", b"")
    for vm in ("vm0", "vm1"):
        assert in_vm(cluster, "cd /root/tree && find . | sort && cat a", vm) == ".\n./a\n./sub\n./sub/b b\nA\n"
    assert cp(cluster, "-r", "vm1:/root/tree", str(tmp_path / "copy")) == (0, b"", b"")
    assert (tmp_path / "copy" / "sub" / "b b").read_bytes() == (src / "sub" / "b b").read_bytes()
    in_vm(cluster, "rm -r /root/tree", "vm[0-1]")


def test_errors(cluster, tmp_path):
    code, out, err = cp(cluster, "vm0:/nonexistent", str(tmp_path / "x"))
    assert (code, out, err) == (4, b"", b"pcocc: error: vm0: cp /nonexistent: /nonexistent: No such file or directory\n")
    code, _, err = cp(cluster, "vm0:/etc", str(tmp_path / "x"))
    assert code == 1 and err == b"pcocc: error: vm0: cp /etc: /etc: is a directory (use -r)\n"
    code, _, err = cp(cluster, "vm[0-1]:/etc/hostname", str(tmp_path))
    assert code == 2 and b"one VM at a time" in err
