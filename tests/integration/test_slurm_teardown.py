"""A job's node teardown under SLURM finishes, whatever ends the job: scancel during node setup,
scancel while the VMs run, the VM step killed, the cluster ended by its -E script. Afterwards
nothing of the job is left on any node (namespaces, OVS bridges and ports, taps, iptables rules,
dnsmasq, undo logs, the plugin's markers), in the store (its keys, its pool entries), or in the
run dirs; and `setup delete` keeps to its deadline, saying what it left."""

import os
import subprocess
from pathlib import Path

import pytest

import leftovers
from test_slurm_cluster import PCOCC, SlurmSite
from waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

FAKE_JOB = 999997
PREFIX = "pl"  # the L3 network's dev-prefix in the test cluster's networks.yaml


@pytest.fixture(scope="module")
def site(testcluster, slurm_user, tiny_image):
    templates = "tiny:\n  image: user:tiny\nl3:\n  inherits: tiny\n  resource-set: l3net\n"
    s = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "tdrepo", templates)
    yield s
    s.cancel_all()


def squeue_ids(site):
    return {j[0] for j in site.squeue()}


def wait_end(site, jobid, timeout=300):
    """Until SLURM forgets the job: its steps killed and its epilogs (the teardown) done on every node."""
    try:
        wait_for(lambda: str(jobid) not in squeue_ids(site), timeout=timeout, what=f"job {jobid} to end")
    except AssertionError:
        raise AssertionError(f"job {jobid} still there: {site.squeue()}\n{slurmd_logs(site)}") from None


def slurmd_logs(site, lines=30):
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:])
                     for p in sorted((Path(site.tc.base) / "slurm" / "log").glob("slurmd-*.log")))


def assert_nothing_left(site, jobid):
    left = leftovers.everything(site, jobid, PREFIX)
    assert not left, f"job {jobid} left {left}\n{slurmd_logs(site)}"


def submit(site, *args, wait=True):
    r = site.pcocc("batch", "--mem-per-cpu=256", *(["--wait"] if wait else []), *args)
    if r.returncode != 0 and r.stdout.strip():
        job = r.stdout.split()[0]
        outs = "".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(site.home.glob(f"pcocc_{job}.*")))
        raise AssertionError(f"{r.stderr}\n{outs}\n{slurmd_logs(site)}")
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[0])


def test_scancel_during_node_setup_leaves_nothing(site, tmp_path):
    """The job is cancelled while its node setup hangs (in dnsmasq, with the namespace, OVS
    bridge, taps, rules and pool entries made): the epilog undoes all of it."""
    tc = site.tc
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "dnsmasq").write_text('#!/bin/sh\n/usr/sbin/dnsmasq "$@" && exec sleep 600\n')
    (shim / "dnsmasq").chmod(0o755)
    wrapper = tmp_path / "pcocc"  # what the plugin runs: the real pcocc, with the hanging dnsmasq for create
    wrapper.write_text(f'#!/bin/sh\nif [ "$3" = create ]; then PATH={shim}:$PATH; export PATH; fi\nexec {PCOCC} "$@"\n')
    wrapper.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    with tc.pcocc_replaced(wrapper):
        jobid = submit(site, "-J", "tdsetup", "-N", "2", "--ntasks-per-node=1", "l3:2", wait=False)
        try:
            wait_for(lambda: len(leftovers.dnsmasq_pids(jobid, [site.tc.node_state_dir(n) for n in site.tc.node_names])) >= 2, timeout=180, what="both nodes' setup in dnsmasq")
            made = leftovers.node_objects(site, jobid, PREFIX)
            assert any(o.startswith("netns ") for o in made) and any(" ovs " in o for o in made), made
            assert [o for o in leftovers.pool_owners(site) if str(o).startswith(f"{jobid}:")]
            tc.run(["scancel", str(jobid)], user=site.user, check=True)
            wait_end(site, jobid)
        finally:
            tc.run(["scancel", str(jobid)])
    assert_nothing_left(site, jobid)


def test_scancel_while_the_vms_run_leaves_nothing(site):
    """scancel signals srun too, which SIGKILLs the VM tasks: their run dir is removed by the epilog."""
    jobid = submit(site, "-J", "tdrun", "-N", "2", "--ntasks-per-node=1", "l3:2")
    assert os.path.isdir(leftovers.run_dir(site, jobid))
    assert leftovers.node_objects(site, jobid, PREFIX) and leftovers.job_processes(jobid, site.pw.pw_uid)  # the checks see a live job
    site.tc.run(["scancel", str(jobid)], user=site.user, check=True)
    wait_end(site, jobid)
    assert_nothing_left(site, jobid)


def test_the_vm_step_killed_leaves_nothing(site):
    """SIGKILL to every VM task (and qemu): nothing of theirs cleans up; the job then ends, and its epilog does."""
    jobid = submit(site, "-J", "tdkill", "-N", "2", "--ntasks-per-node=1", "l3:2")
    steps = site.tc.run(["squeue", "-h", "-s", "-j", str(jobid), "-o", "%i"]).stdout.split()
    vm_step = next(s for s in steps if s.split(".")[1].isdigit())
    site.tc.run(["scancel", "--signal=KILL", vm_step], user=site.user, check=True)
    wait_end(site, jobid)
    assert_nothing_left(site, jobid)


def test_a_cluster_ended_by_its_script_leaves_nothing(site):
    """`alloc -E`: when the script ends, the launcher asks the VMs to stop (SIGINT through srun -X)."""
    script = site.home / "td-end.sh"
    script.write_text("#!/bin/sh\necho job $PCOCC_JOB_ID\n")
    script.chmod(0o755)
    subprocess.run(["chown", site.user, str(script)], check=True)
    r = site.pcocc("alloc", "-J", "tdend", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "-E", script, "l3:2")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split("job ")[1].split()[0])
    wait_end(site, jobid)
    assert_nothing_left(site, jobid)
    # the VM tasks stopped by themselves: none was killed by a signal (srun would say so)
    assert "Killed" not in r.stderr and "forcing job termination" not in r.stderr, r.stderr


def test_setup_delete_keeps_its_deadline_and_says_what_is_left(site, tmp_path):
    """An undo step that hangs is interrupted at the deadline (its command killed); what is left
    stays in the undo log, named in the error; the next delete finishes the work."""
    from pcocc.networks.undo import UndoLog

    tc, node = site.tc, "node1"
    state_dir = Path(tc.node_state_dir(node))
    first, last = tmp_path / "first-made", tmp_path / "last-made"
    first.touch()
    last.touch()
    log = UndoLog(str(state_dir))
    log.drop(FAKE_JOB)
    log.record(FAKE_JOB, "file", path=str(first))
    log.record(FAKE_JOB, "link", name=f"pdt{FAKE_JOB}")
    log.record(FAKE_JOB, "file", path=str(last))
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ip").write_text(f'#!/bin/sh\necho $$ >> {tmp_path}/ip-pids\nexec sleep 600\n')  # `ip link del` hangs
    (shim / "ip").chmod(0o755)
    argv = [PCOCC, "internal", "setup", "delete", "-j", FAKE_JOB, "--uid", site.pw.pw_uid, "--deadline", "3"]
    r = tc.onnode(node, argv, env={"PATH": f"{shim}:{os.environ['PATH']}"}, timeout=120)
    try:
        assert r.returncode != 0
        assert "2 object(s) not removed" in r.stderr and "deadline" in r.stderr, r.stderr
        assert f"link name=pdt{FAKE_JOB}" in r.stderr and f"file path={first}" in r.stderr, r.stderr
        assert not last.exists() and first.exists()  # newest first: the step before the hang was done
        assert [e["kind"] for e in log.entries(FAKE_JOB)] == ["file", "link"]
        for pid in map(int, (tmp_path / "ip-pids").read_text().split()):  # the hanging command was killed
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    finally:
        r = tc.onnode(node, argv[:-2], timeout=120)  # the real `ip`: done
    assert r.returncode == 0, r.stderr
    assert log.entries(FAKE_JOB) == [] and not first.exists()


def test_run_dirs_are_removed_only_when_they_are_the_users(site, tmp_path):
    """The epilog's removal follows no symlink and keeps to directories of the job's user."""
    from pcocc.lifecycle.nodesetup import remove_run_dir

    uid = site.pw.pw_uid
    base = tmp_path / "run"
    base.mkdir()
    os.chown(base, uid, site.pw.pw_gid)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("root's")
    os.symlink(victim, base / "job_1")  # the user's link to root's directory
    os.mkdir(base / "job_2")  # root's directory in the user's run dir
    (base / "job_2" / "x").touch()
    os.mkdir(base / "job_3")  # the user's, with a link inside
    os.symlink(victim, base / "job_3" / "link")
    (base / "job_3" / "data").write_text("vm files")
    subprocess.run(["chown", "-hR", f"{uid}:{site.pw.pw_gid}", str(base / "job_3")], check=True)
    ids = (os.geteuid(), os.getegid(), sorted(os.getgroups()))
    for n in (1, 2, 3):
        remove_run_dir(str(base / f"job_{n}"), uid)
    assert (victim / "precious").exists() and os.path.islink(base / "job_1")
    assert (base / "job_2" / "x").exists()
    assert not os.path.lexists(base / "job_3")
    remove_run_dir(str(base / "job_3"), uid)  # idempotent
    remove_run_dir(str(tmp_path / "elsewhere"), uid)  # not a job dir: left alone
    assert (os.geteuid(), os.getegid(), sorted(os.getgroups())) == ids  # root's ids again
