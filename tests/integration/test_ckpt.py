"""pcocc ckpt and alloc|batch -r on the local backend, with real qemu (TCG here):
a whole cluster's disks and memory go to a directory, and it goes on from there."""

import json
import os

import pytest

from local_site import LocalSite
from pcocc.errors import ExitStatus

pytestmark = pytest.mark.integration

# a counter held by a process (its shell variable), mirrored in a tmpfs file
COUNTER = ("nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/cnt; sleep 0.2; done' "
           ">/dev/null 2>&1 </dev/null & echo $! > /run/cnt.pid")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_image):
    s = LocalSite(tmp_path_factory.mktemp("ckpt"), tiny_image)
    share = s.root / "share"
    share.mkdir()
    drive = s.root / "drive.raw"
    drive.write_bytes(b"\0" * 2**20)
    s.write(".pcocc/templates.yaml", f"tiny:\n  image: user:tiny\nshared:\n  image: user:tiny\n  mount-points:\n    share: {share}\n"
                                     f"drive:\n  image: user:tiny\n  persistent-drives:\n    - {drive}\n")
    yield s
    s.cleanup()


def ps(site):
    return json.loads(site.pcocc("ps", "--json", check=True).stdout)


def per_vm(site, jobid, cmd, n=2):
    return {vm: out.split() for vm, out in site.per_vm(jobid, cmd, n).items()}


def test_checkpoint_and_restart_a_cluster_with_state_in_memory(site):
    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:2")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    assert site.pcocc("exec", "-j", job, COUNTER).returncode == 0
    site.pcocc("exec", "-j", job, "echo on-disk > /root/disk.txt", check=True)
    before = per_vm(site, job, "sleep 1; cat /run/cnt /run/cnt.pid")
    assert all(int(v[0]) > 0 for v in before.values())
    ck = site.root / "ck"
    r = site.pcocc("ckpt", "-j", job, "--json", ck)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["definition"] == "tiny:2" and [v["name"] for v in manifest["vms"]] == ["vm0", "vm1"]
    assert {"ckpt.json", "disk-vm0.qcow2", "disk-vm1.qcow2"} <= set(os.listdir(ck))
    assert ps(site) == []  # the cluster stopped
    assert not [f for f in os.listdir(site.root) if ".partial-" in f]
    ended = json.loads(site.pcocc("history", "-j", job, "--json", check=True).stdout)
    assert [(e["state"], e["reason"]) for e in ended] == [("COMPLETED", f"checkpointed to {ck}")]  # not a cancel

    # refused before anything starts: another definition, other resources
    r = site.pcocc("batch", "-m", "256", "-r", ck, "tiny:3")
    assert r.returncode == ExitStatus.USAGE and "tiny:2" in r.stderr
    r = site.pcocc("batch", "-m", "256", "-r", ck, "shared:2")
    assert r.returncode == ExitStatus.USAGE and "tiny:2" in r.stderr
    r = site.pcocc("batch", "-m", "512", "-r", ck, "tiny:2")
    assert r.returncode == ExitStatus.USAGE and "256 MiB" in r.stderr
    r = site.pcocc("batch", "-m", "256", "-r", site.root, "tiny:2")
    assert r.returncode == ExitStatus.NOT_FOUND and "not a checkpoint" in r.stderr
    assert ps(site) == []

    r = site.pcocc("batch", "-m", "256", "-r", ck, "--wait", "tiny:2")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    after = per_vm(site, job, "cat /run/cnt /run/cnt.pid; kill -0 $(cat /run/cnt.pid) && echo alive")
    later = per_vm(site, job, "sleep 1; cat /run/cnt")
    for vm in ("vm0", "vm1"):
        count, pid, alive = after[vm]
        assert pid == before[vm][1] and alive == "alive"  # the very same process
        assert int(count) >= int(before[vm][0])  # it went on from where it was
        assert int(later[vm][0]) > int(count)  # and it goes on
    assert per_vm(site, job, "cat /root/disk.txt; hostname") == {"vm0": ["on-disk", "vm0"], "vm1": ["on-disk", "vm1"]}

    # a checkpoint over an existing directory needs -F; the one we restarted from can be replaced
    r = site.pcocc("ckpt", "-j", job, ck)
    assert r.returncode == ExitStatus.USAGE and "-F" in r.stderr
    assert len(ps(site)) == 1  # refused before touching the cluster
    r = site.pcocc("ckpt", "-j", job, "-F", ck)
    assert r.returncode == 0, r.stderr
    assert ps(site) == []
    r = site.pcocc("batch", "-m", "256", "-r", ck, "--wait", "tiny:2")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    again = per_vm(site, job, "cat /run/cnt /run/cnt.pid")
    assert int(again["vm0"][0]) >= int(later["vm0"][0]) and again["vm0"][1] == before["vm0"][1]
    site.pcocc("cancel", "-j", job, check=True)


def test_checkpoint_refuses_9p_mounts(site):
    r = site.pcocc("batch", "-m", "256", "--wait", "shared:1")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    r = site.pcocc("ckpt", "-j", job, site.root / "ck9p")
    assert r.returncode == ExitStatus.ERROR and "9p mounts (share)" in r.stderr, r.stderr
    assert not (site.root / "ck9p").exists()
    (job_info,) = ps(site)
    assert job_info["vm_states"] == {"vm0": "running"}  # untouched
    site.pcocc("cancel", "-j", job, check=True)


def test_persistent_drives_are_copied_whole_and_must_not_change_before_the_restart(site):
    drive = site.root / "drive.raw"
    r = site.pcocc("batch", "-m", "256", "--wait", "drive:1")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    site.pcocc("exec", "-j", job, "printf persistent-data | dd of=/dev/vdb conv=fsync 2>/dev/null", check=True)
    ck = site.root / "ckdrive"
    r = site.pcocc("ckpt", "-j", job, ck)
    assert r.returncode == 0, r.stderr
    assert (ck / "drive-vm0-0.raw").read_bytes()[:15] == b"persistent-data"  # a whole copy
    assert drive.read_bytes()[:15] == b"persistent-data"
    st = drive.stat()
    os.utime(drive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # someone touched it
    r = site.pcocc("batch", "-m", "256", "-r", ck, "--wait", "drive:1")
    assert r.returncode != 0 and "changed since the checkpoint" in r.stderr, r.stderr
    site.cleanup()
    os.utime(drive, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = site.pcocc("batch", "-m", "256", "-r", ck, "--wait", "drive:1")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    r = site.pcocc("exec", "-j", job, "head -c 15 /dev/vdb")
    assert r.returncode == 0 and r.stdout == "persistent-data"
    site.pcocc("cancel", "-j", job, check=True)


def test_force_never_deletes_what_is_not_a_checkpoint_and_a_full_disk_keeps_the_cluster(site):
    """repro 08 (ckpt -F on an ordinary directory) and r01 (ENOSPC once the state is written)."""
    import subprocess

    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:1")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    try:
        site.pcocc("exec", "-j", job, "echo precious > /root/work.txt; sync", check=True)
        precious = site.root / "precious"
        (precious / "sub").mkdir(parents=True)
        (precious / "thesis.txt").write_text("two years of work")
        (precious / "sub" / "data").write_text("x")
        r = site.pcocc("ckpt", "-j", job, "-F", precious)
        assert r.returncode == ExitStatus.USAGE and "not a pcocc checkpoint" in r.stderr, r.stderr
        assert (precious / "thesis.txt").read_text() == "two years of work" and (precious / "sub" / "data").exists()
        assert ps(site)[0]["vm_states"] == {"vm0": "running"}  # refused before touching the cluster

        # room for the disk delta and the memory image, but no inode left for the manifest
        full = site.root / "fullfs"
        full.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m,nr_inodes=4", "tmpfs", str(full)], check=True)
        try:
            r = site.pcocc("ckpt", "-j", job, full / "ck")
            assert r.returncode == ExitStatus.ERROR and "No space left on device" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and "goes on as it was" in r.stderr
            assert os.listdir(full) == []  # the staging directory went
        finally:
            subprocess.run(["umount", str(full)], check=True)
        assert ps(site)[0]["vm_states"] == {"vm0": "running"}
        r = site.pcocc("exec", "-j", job, "cat /root/work.txt")  # the VM resumed, with its state
        assert r.returncode == 0 and r.stdout.strip() == "precious", r.stderr
    finally:
        site.pcocc("cancel", "-j", job)
