"""Under SLURM, a VM whose task or qemu is killed is shown failed by ps, with the reason, and
the cluster runs on with its other VMs (as on the local backend, test_local_faults.py).

Nothing but slurmstepd sees a VM task killed (the launcher sees srun only): the SPANK
plugin's task_exit hook marks the VM failed (`pcocc internal setup task-exit`). A qemu
killed is seen by its VM task, which says so and exits; the launcher goes on with the
VMs that run (lifecycle.launcher.wait_started)."""

import json
import os
import signal

import pytest

from test_slurm_cluster import SlurmSite
from test_slurm_teardown import assert_nothing_left, wait_end
from waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

PREFIX = "pl"


@pytest.fixture(scope="module")
def site(testcluster, slurm_user, tiny_image):
    s = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "vfrepo", "tiny:\n  image: user:tiny\n")
    yield s
    s.cancel_all()


def vm_records(site, jobid):
    prefix = f"/pcocc/users/{site.user}/clusters/{jobid}/vms/"
    return {v["name"]: v for v in site.keys(prefix).values()}


def ps_job(site, jobid):
    r = site.pcocc("ps", "--json")
    assert r.returncode == 0, r.stderr
    return next((j for j in json.loads(r.stdout) if j["jobid"] == jobid), None)


def submit(site, *args):
    r = site.pcocc("batch", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", *args, "tiny:2")
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[0])


def killed_vm_fails_and_the_cluster_runs_on(site, jobid, field):
    """SIGKILL vm1's `field` process (pid: its task; qemu_pid: its qemu) once it is known; then
    vm1 is failed in ps with a reason, vm0 reaches running, and the job stays in the queue."""
    vm1 = wait_for(lambda: vm_records(site, jobid).get("vm1", {}).get(field) and vm_records(site, jobid)["vm1"],
                   timeout=600, what=f"vm1's {field}")
    os.kill(vm1[field], signal.SIGKILL)
    job = wait_for(lambda: (j := ps_job(site, jobid)) and j["vm_states"].get("vm1") == "failed" and j,
                   timeout=300, what="vm1 failed in ps")
    wait_for(lambda: ps_job(site, jobid)["vm_states"].get("vm0") == "running", timeout=600, what="vm0 running")
    assert str(jobid) in {j[0] for j in site.squeue()}, "the cluster ended with its VM"
    return job


def test_a_killed_vm_task_is_shown_failed_and_the_cluster_runs_on(site):
    jobid = submit(site)
    try:
        job = killed_vm_fails_and_the_cluster_runs_on(site, jobid, "pid")
        assert "signal 9" in job["errors"]["vm1"], job
        # its qemu went with it (parent-death signal), nothing of vm1 runs
        rec = vm_records(site, jobid)["vm1"]
        if rec.get("qemu_pid"):
            wait_for(lambda: not _alive(rec["qemu_pid"]), timeout=60, what="vm1's qemu to die with its task")
    finally:
        site.tc.run(["scancel", str(jobid)])
    wait_end(site, jobid)
    assert_nothing_left(site, jobid)
    # the history keeps how it ended: cancelled, with vm1's failure (written by its launcher)
    r = site.pcocc("history", "-j", jobid, "--json")
    assert r.returncode == 0, r.stderr
    (entry,) = json.loads(r.stdout)
    assert entry["state"] == "CANCELLED", entry
    vm1 = [v for v in entry["vms"] if v["name"] == "vm1"][0]
    assert vm1["state"] == "failed" and "signal 9" in vm1["error"], entry


def test_a_killed_qemu_fails_its_vm_only(site):
    jobid = submit(site)
    try:
        job = killed_vm_fails_and_the_cluster_runs_on(site, jobid, "qemu_pid")
        assert "qemu" in job["errors"]["vm1"], job
    finally:
        site.tc.run(["scancel", str(jobid)])
    wait_end(site, jobid)
    assert_nothing_left(site, jobid)


def test_task_exit_marks_only_a_vm_that_did_not_say_how_it_ended(site):
    """`setup task-exit` as the plugin runs it: an unannounced end is marked failed; a VM that
    said it stopped keeps its state; a cluster gone gets no record back."""
    from pcocc.lifecycle import nodesetup

    class Ctx:
        store = site.store()
        hostname = "node1"

    jobid, user = 999995, site.user
    prefix = f"/pcocc/users/{user}/clusters/{jobid}/"
    try:
        Ctx.store.put(prefix + "info", {"jobid": jobid})
        Ctx.store.put(prefix + "vms/0", {"rank": 0, "name": "vm0", "state": "running"})
        Ctx.store.put(prefix + "vms/1", {"rank": 1, "name": "vm1", "state": "stopped"})
        assert nodesetup.task_exit(Ctx, jobid, site.pw.pw_uid, 0, signal.SIGKILL)["error"] == \
            "its process was killed by signal 9 (SIGKILL)"
        assert nodesetup.task_exit(Ctx, jobid, site.pw.pw_uid, 1, 3 << 8) is None
        assert Ctx.store.get(prefix + "vms/1")["state"] == "stopped"
        rec = nodesetup.task_exit(Ctx, jobid, site.pw.pw_uid, 2, 3 << 8)  # never published: a record of its own
        assert rec == {"rank": 2, "name": "vm2", "host": "node1", "state": "failed", "error": "its process exited with status 3"}
        Ctx.store.delete_prefix(prefix)
        assert nodesetup.task_exit(Ctx, jobid, site.pw.pw_uid, 0, signal.SIGKILL) is None
        assert Ctx.store.range(prefix) == {}
    finally:
        Ctx.store.delete_prefix(prefix)
        Ctx.store.close()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_failed_setup_teardown_records_the_node_failed_for_the_others(site):
    """The plugin's teardown after a failed create (`setup delete --failed MESSAGE`, also when the
    create was SIGKILLed and could not say so) leaves the node recorded failed with the reason:
    the other nodes' wait for peers and the launcher's wait stop at once, naming it."""
    import subprocess

    from pcocc.errors import PcoccError
    from pcocc.lifecycle.launcher import wait_started
    from pcocc.networks.jobnet import wait_peers

    tc, jobid = site.tc, 999994
    prefix = f"/pcocc/users/{site.user}/clusters/{jobid}/"
    store = site.store()
    try:
        store.put(prefix + "info", {"jobid": jobid, "vms": [{}, {}]})
        env = {**os.environ, **tc.env, **tc.node_env("node1")}
        r = subprocess.run([*tc.enter_argv("node1"), tc.pcocc, "internal", "setup", "delete", "-j", str(jobid),
                            "--uid", str(site.pw.pw_uid), "--failed", "pcocc: error: killed by signal 9"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert store.get(prefix + "nodes/node1") == {"state": "failed", "error": "killed by signal 9"}
        assert store.get(prefix + "peers/node1") == {"state": "failed", "error": "killed by signal 9"}  # what peers wait on
        with pytest.raises(PcoccError, match="node node1 failed: killed by signal 9"):
            wait_peers(store, prefix + "peers/", ["node1", "node2"], "node2", lambda j: True, jobid, timeout=5)

        class Backend:  # the launcher's view of the job: the records as the store has them
            def job(self, j):
                nodes = {k.rsplit("/", 1)[1]: v for k, v in store.range(prefix + "nodes/").items()}
                return {"nodes": nodes, "vms": [{}, {}]}, [{"name": f"vm{i}", "state": "pending"} for i in range(2)]

            def watch_job(self, j):  # what the launcher follows: here, the records as they are now
                from pcocc.batch.base import JobView

                return JobView.of(*self.job(j))

        with pytest.raises(PcoccError, match="node setup failed on node1: killed by signal 9"):
            wait_started(Backend(), jobid, lambda *a: None, alive=lambda: True, timeout=5)
    finally:
        store.delete_prefix(prefix)
        store.close()
