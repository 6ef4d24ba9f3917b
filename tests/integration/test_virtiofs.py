"""virtio-fs mount points on the local backend: an unprivileged virtiofsd in a user namespace
mapping the owner's uid only, refused where that is not sound (hypervisor.virtiofs.check_sound)."""

import os

import pytest

from local_site import LocalSite

pytestmark = pytest.mark.integration

def virtiofsd_pids():
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].endswith(b"virtiofsd"):
                    out.append(int(pid))
        except OSError:
            continue
    return out


def test_a_virtio_fs_share_of_roots_cluster_is_refused_with_the_reason(tmp_path_factory, tiny_image):
    """Root's virtiofsd (even in a user namespace, which maps root to root) would let root in the
    guest create setuid-root files on the host: the VM fails at once, in one line, and no
    virtiofsd is left. (The tests run as root; the rule for other users is unit-tested.)"""
    site = LocalSite(tmp_path_factory.mktemp("vfs"), tiny_image)
    rw = site.root / "rw"
    rw.mkdir()
    site.write(".pcocc/templates.yaml", f"vfs:\n  image: user:tiny\n  mount-points:\n    rw: {{path: {rw}, type: virtio-fs}}\n")
    before = set(virtiofsd_pids())
    try:
        r = site.pcocc("batch", "-m", "256", "--wait", "vfs:1")
        assert r.returncode != 0 and "virtio-fs is refused for root's clusters" in r.stderr, r.stderr
        assert set(virtiofsd_pids()) - before == set()
    finally:
        site.cleanup()
