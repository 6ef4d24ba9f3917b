"""Instant clusters on the local backend: VMs restored from their template's memory snapshot,
each given its own identity, and a snapshot that no longer matches is not used."""

import json

import pytest

from local_site import LocalSite
from pcocc.errors import ExitStatus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_image):
    s = LocalSite(tmp_path_factory.mktemp("instant"), tiny_image)
    share = s.root / "share"
    share.mkdir()
    s.write(".pcocc/templates.yaml", f"tiny:\n  image: user:tiny\nshared:\n  image: user:tiny\n  mount-points:\n    share: {share}\n")
    yield s
    s.cleanup()


def each(site, job, cmd, n):
    return {vm: out.strip() for vm, out in site.per_vm(job, cmd, n).items()}


def test_an_instant_cluster_has_vms_of_their_own(site):
    r = site.pcocc("template", "snapshot", "-m", "256", "tiny")
    assert r.returncode == 0, r.stderr
    assert (site.home / ".pcocc/snapshots/tiny/ckpt.json").exists()
    assert json.loads(site.pcocc("ps", "--json", check=True).stdout) == []  # the snapshot's VM is gone

    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:3")
    assert r.returncode == 0, r.stderr
    assert "restoring the VMs of tiny from their template's snapshot" in r.stderr
    job = int(r.stdout)
    names = each(site, job, "hostname; cat /etc/hostname; grep 127.0.1.1 /etc/hosts | cut -f2", 3)
    assert names == {f"vm{i}": f"vm{i}\nvm{i}\nvm{i}" for i in range(3)}
    r = site.pcocc("console", "-l", "vm1")  # restored, not booted: no boot of its own on its console
    assert r.returncode == 0 and "PCOCC-READY" not in r.stdout
    site.pcocc("cancel", "-j", job, check=True)

    # --boot ignores the snapshot
    r = site.pcocc("batch", "-m", "256", "--boot", "--wait", "tiny:1")
    assert r.returncode == 0 and "restoring" not in r.stderr, r.stderr
    site.pcocc("cancel", "-j", int(r.stdout), check=True)


def test_each_restored_vm_has_randomness_of_its_own(site):
    """Copies of one snapshot share the guest kernel's random generator: the identity step reseeds it."""
    r = site.pcocc("template", "snapshot", "-m", "256", "tiny")
    assert r.returncode == 0, r.stderr
    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:3")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    try:
        rand = each(site, job, "head -c 16 /dev/urandom | od -An -tx1", 3)
        assert len(set(rand.values())) == 3
    finally:
        site.pcocc("cancel", "-j", job, check=True)
        site.pcocc("template", "snapshot", "--delete", "tiny")


def test_a_changed_image_or_resources_invalidate_the_snapshot(site):
    if not (site.home / ".pcocc/snapshots/tiny/ckpt.json").exists():
        site.pcocc("template", "snapshot", "-m", "256", "tiny", check=True)
    r = site.pcocc("batch", "-m", "512", "--wait", "tiny:1")  # other resources: it boots
    assert r.returncode == 0 and "taken with 1 core(s) and 256 MiB" in r.stderr, r.stderr
    job = int(r.stdout)
    r = site.pcocc("save", "-j", job)  # a new revision of the image
    assert r.returncode == 0, r.stderr
    site.pcocc("cancel", "-j", job, check=True)
    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:1")
    assert r.returncode == 0 and "the image changed since" in r.stderr, r.stderr
    site.pcocc("cancel", "-j", int(r.stdout), check=True)
    r = site.pcocc("template", "snapshot", "--delete", "tiny")
    assert r.returncode == 0 and not (site.home / ".pcocc/snapshots/tiny").exists()


def test_snapshot_refusals(site):
    r = site.pcocc("template", "snapshot", "shared")
    assert r.returncode == ExitStatus.ERROR and "9p mounts" in r.stderr
    r = site.pcocc("template", "snapshot", "--delete", "shared")
    assert r.returncode == ExitStatus.NOT_FOUND and "no snapshot" in r.stderr
