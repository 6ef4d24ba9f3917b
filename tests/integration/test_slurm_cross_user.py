"""Two unprivileged users on the SLURM test cluster (issue 12, section 4: "no way in"), with
real VMs: what one user makes on a node is his own, and the other can neither plant a trap in
it nor lock him out of his VMs. (The store's per-user isolation is tested in test_etcd_rbac.py
and test_slurm_cluster.py; the same on one host, local backend, in test_cross_user.py.)"""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from waiting import wait_for

from flood import flooding
from test_slurm_cluster import SlurmSite, qemu_processes

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

@pytest.fixture(scope="module")
def victim(testcluster, tiny_image):
    """A user of his own (a uid no earlier test used: nothing of his exists on the nodes yet)."""
    entry = testcluster.add_user(f"pcoccv{testcluster.id}")
    shutil.rmtree(f"/tmp/pcocc-{entry.pw_uid}", ignore_errors=True)  # left by an earlier user of this uid, since deleted
    s = SlurmSite.with_image(testcluster, entry.pw_name, tiny_image, "repo", "tiny:\n  image: user:tiny\n")
    yield s
    s.cancel_all()
    shutil.rmtree(f"/tmp/pcocc-{entry.pw_uid}", ignore_errors=True)
    Path(f"/tmp/pcocc-accel-{entry.pw_uid}.json").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def intruder(testcluster):
    """Another plain user of the same nodes."""
    return testcluster.add_user(f"pcocci{testcluster.id}")


def test_a_run_dir_planted_by_another_user_is_not_used_and_does_not_lock_the_victim_out(victim, intruder):
    """The intruder makes the victim's default run dir first (/tmp is shared by every user of a
    node): the victim's VMs run from ~/.cache/pcocc/run-<node> instead (it used to fail the
    job, so the intruder could keep the victim from pcocc), and nothing lands in the trap."""
    trap = Path(f"/tmp/pcocc-{victim.pw.pw_uid}")
    assert not trap.exists()
    victim.tc.run(["mkdir", "-m", "0777", str(trap)], user=intruder.pw_name, check=True)
    try:
        r = victim.pcocc("batch", "-N", "1", "--mem-per-cpu=256", "--wait", "tiny:1")
        assert r.returncode == 0, r.stderr
        jobid = int(r.stdout.split()[0])
        (vm,) = victim.keys(f"/pcocc/users/{victim.user}/clusters/{jobid}/vms/").values()
        moved = Path(victim.pw.pw_dir) / ".cache" / "pcocc" / f"run-{vm['host']}"
        for path in (moved, moved / f"job_{jobid}"):
            st = os.lstat(path)
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == victim.pw.pw_uid and stat.S_IMODE(st.st_mode) == 0o700, path
        assert os.listdir(trap) == []
        assert victim.pcocc("cancel", "-j", jobid).returncode == 0
        wait_for(lambda: not [j for j in victim.squeue() if j[1] == victim.user], what="the job to end")
        wait_for(lambda: not (moved / f"job_{jobid}").exists(), what="the job's run dir to go (its epilog)")
        assert os.listdir(trap) == []
    finally:
        shutil.rmtree(trap, ignore_errors=True)


def test_the_vm_run_dir_is_private_and_a_flood_does_not_lock_its_owner_out(victim, intruder):
    r = victim.pcocc("batch", "-N", "1", "--mem-per-cpu=256", "--wait", "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    (vm,) = victim.keys(f"/pcocc/users/{victim.user}/clusters/{jobid}/vms/").values()
    # the run dir and everything of the VM in it: the victim's only
    top = Path(f"/tmp/pcocc-{victim.pw.pw_uid}")
    for path in (top, top / f"job_{jobid}"):
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == victim.pw.pw_uid and stat.S_IMODE(st.st_mode) == 0o700, path
    r = victim.tc.run(["ls", str(top)], user=intruder.pw_name)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # the intruder holds hundreds of connections to the VM's control endpoint, from the VM's
    # node (a local peer, refused by uid) and from outside it (a remote peer, before TLS)
    host, port = vm["control"]
    with flooding(intruder.pw_name, host, port, prefix=victim.tc.enter_argv(vm["host"])), flooding(intruder.pw_name, host, port):
        r = victim.pcocc("exec", "-j", jobid, "echo", "still mine")
        assert r.returncode == 0 and r.stdout == "still mine\n", r.stderr
        r = victim.pcocc("save", "-j", jobid, "--json", "vm0", timeout=600)
        assert r.returncode == 0 and json.loads(r.stdout)["uri"] == "user:tiny@1", r.stderr
    victim.tc.run(["scancel", str(jobid)], user=victim.user, check=True)
    wait_for(lambda: not [j for j in victim.squeue() if j[1] == victim.user], what="the job to end")
    wait_for(lambda: not qemu_processes(victim.pw.pw_uid), timeout=60, what="qemu to stop")
    assert not (top / f"job_{jobid}").exists()
