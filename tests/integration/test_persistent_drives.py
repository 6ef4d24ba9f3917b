"""Persistent drives with real VMs on the local backend: multi-mount protection (mmp) keeps a
drive attached read-write by one cluster at a time; `save -i N` copies drive N while it runs."""

import json

import pytest

from local_site import LocalSite

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_image):
    s = LocalSite(tmp_path_factory.mktemp("drives"), tiny_image)
    drive = s.root / "drive.raw"
    drive.write_bytes(b"\0" * 2**20)
    s.write(".pcocc/templates.yaml",
            f"drive:\n  image: user:tiny\n  persistent-drives:\n    - {drive}\n"
            f"shared:\n  image: user:tiny\n  persistent-drives:\n    - {drive}:\n        mmp: cluster\n")
    yield s
    s.cleanup()


def batch(site, definition):
    r = site.pcocc("batch", "-m", "256", "--wait", definition)
    return r, int(r.stdout.split()[0]) if r.stdout.strip() else None


def test_a_drive_is_attached_by_one_cluster_at_a_time(site):
    r, first = batch(site, "drive:1")
    assert r.returncode == 0, r.stderr
    try:
        r, second = batch(site, "drive:1")
        assert r.returncode != 0
        assert f"already attached to cluster {first}" in r.stderr, r.stderr
        site.pcocc("cancel", "-j", second)
        # mmp: yes also keeps two VMs of one cluster off one drive
        r, third = batch(site, "shared:1")  # mmp: cluster, but cluster `first` holds it
        assert r.returncode != 0 and f"cluster {first}" in r.stderr, r.stderr
        site.pcocc("cancel", "-j", third)
    finally:
        site.pcocc("cancel", "-j", first)
    # given back at the end: the VMs of one cluster share it with mmp: cluster
    r, fourth = batch(site, "shared:2")
    try:
        assert r.returncode == 0, r.stderr
        (job,) = [j for j in json.loads(site.pcocc("ps", "--json", check=True).stdout) if j["jobid"] == fourth]
        assert set(job["vm_states"].values()) == {"running"}
    finally:
        site.pcocc("cancel", "-j", fourth)


def test_save_i_copies_a_running_vms_drive_to_its_backup_and_replaces_it_whole(site):
    drive, backup = site.root / "data.raw", site.root / "backups" / "data.raw"
    drive.write_bytes(b"written-before-the-start".ljust(2**20, b"\0"))
    backup.parent.mkdir(exist_ok=True)
    backup.write_bytes(b"previous backup")
    site.write(".pcocc/templates.yaml", (site.home / ".pcocc/templates.yaml").read_text() +
               f"backed:\n  image: user:tiny\n  persistent-drives:\n    - {drive}:\n        backup: {backup}\n")
    r, jobid = batch(site, "backed:1")
    try:
        assert r.returncode == 0, r.stderr
        # qemu copies what the running VM sees of its drive (without a guest agent freeze if none answers)
        r = site.pcocc("save", "-j", jobid, "-i", "0", "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["target"] == str(backup) and res["bytes"] == 2**20
        assert backup.read_bytes()[:24] == b"written-before-the-start"
        assert not list(backup.parent.glob("*.pcocc-tmp"))
        # errors: a drive the VM does not have; a drive with no backup and no -d
        r = site.pcocc("save", "-j", jobid, "-i", "3")
        assert r.returncode != 0 and "no persistent drive 3" in r.stderr, r.stderr
        other = site.root / "elsewhere.raw"
        r = site.pcocc("save", "-j", jobid, "-i", "0", "-d", other)
        assert r.returncode == 0, r.stderr
        assert other.read_bytes()[:24] == b"written-before-the-start"
    finally:
        site.pcocc("cancel", "-j", jobid)
