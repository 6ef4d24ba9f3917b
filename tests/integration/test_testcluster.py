"""The real multi-node test cluster (pcocc.testcluster) and the pcocc SPANK plugin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_for

from pcocc.testcluster import TestCluster, slurm
from pcocc.testcluster.net import ClashError, Layout
from slurm_fixture import leftovers, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

TESTCLUSTER = Path(sys.executable).parent / "pcocc-testcluster"

# Stands in for `pcocc internal setup`: records how it was run, fails `create` on demand.
FAKE_PCOCC = """#!/usr/bin/python3
import fcntl, json, os, socket, sys
here = os.path.dirname(os.path.realpath(__file__))
record = {"host": socket.gethostname(), "uid": os.getuid(), "args": sys.argv[1:],
          "env": {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_UID", "SLURM_STEP_ID", "OVS_RUNDIR", "SLURM_CONF",
                                                 "PCOCC_TASK_HOME")}}
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(json.dumps(record) + "\\n")
if sys.argv[1:4] == ["internal", "setup", "create"] and os.path.exists(os.path.join(here, "fail")):
    print("starting the node's network", file=sys.stderr)
    print("no free VXLAN id for this job (fake)", file=sys.stderr)
    sys.exit(3)
if sys.argv[1:4] == ["internal", "setup", "delete"] and os.path.exists(os.path.join(here, "slow-delete")):
    import time
    time.sleep(3)
    with open(os.path.join(here, "calls.jsonl"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps({**record, "args": ["internal", "setup", "delete-done"]}) + "\\n")
"""




@pytest.fixture
def fake_pcocc(testcluster, tmp_path):
    """Point the plugin at a fake pcocc for one test; returns a reader of its calls."""
    fake = tmp_path / "pcocc"
    fake.write_text(FAKE_PCOCC)
    fake.chmod(0o755)

    class Calls:
        dir = tmp_path

        def __call__(self, job=None):
            path = tmp_path / "calls.jsonl"
            calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
            return [c for c in calls if job is None or c["env"]["SLURM_JOB_ID"] == str(job)]

    with testcluster.pcocc_replaced(fake):
        yield Calls()


def job_done(tc, job):
    return not tc.run(["squeue", "-h", "-j", job]).stdout.strip()


# ---------------------------------------------------------------- the cluster


def test_layout_names_are_short_distinct_and_stable():
    a, b = Layout(Path("/tmp/a"), 12), Layout(Path("/tmp/b"), 12)
    assert a.id == Layout(Path("/tmp/a"), 2).id and a.id != b.id
    for layout in (a, b):
        names = [layout.bridge] + [layout.veth(n) for n in layout.node_names]
        assert all(len(n) <= 15 for n in names)  # IFNAMSIZ
        assert len(set(names)) == len(names)
        assert all(layout.node_ip(n) in [str(h) for h in layout.subnet.hosts()] for n in layout.node_names)
    assert a.subnet != b.subnet or a.port_base != b.port_base


def test_every_node_is_idle(testcluster):
    states = slurm.node_states(testcluster.base)
    assert states == {n: "idle" for n in testcluster.node_names}
    assert testcluster.env["SLURM_CONF"] == testcluster.slurm_conf


def test_srun_as_unprivileged_user_runs_on_every_node(testcluster, slurm_user):
    n = len(testcluster.node_names)
    r = testcluster.run(["srun", f"-N{n}", "hostname"], user=slurm_user, check=True)
    assert sorted(r.stdout.split()) == testcluster.node_names
    r = testcluster.run(["srun", f"-N{n}", "id", "-un"], user=slurm_user, check=True)
    assert r.stdout.split() == [slurm_user] * n


def test_sbatch(testcluster, slurm_user):
    out = Path(testcluster.run(["sh", "-c", "echo $HOME"], user=slurm_user).stdout.strip()) / "batch-%j.out"
    r = testcluster.run(["sbatch", "--parsable", "-N2", "-o", out, "--wrap", "srun hostname"], user=slurm_user, check=True)
    job = r.stdout.strip().split(";")[0]
    wait_for(lambda: job_done(testcluster, job), what=f"batch job {job}")
    hosts = Path(str(out).replace("%j", job)).read_text().split()
    assert len(set(hosts)) == 2 and set(hosts) <= set(testcluster.node_names)


def test_vm_option_is_known_to_salloc_and_sbatch(testcluster, slurm_user):
    r = testcluster.run(["salloc", "--vm", "--no-shell", "-N1", "-J", "vmopt"], user=slurm_user)
    assert r.returncode == 0, r.stderr
    assert "Granted job allocation" in r.stderr
    job = r.stderr.split("Granted job allocation")[1].split()[0]
    testcluster.run(["scancel", job], check=True)
    r = testcluster.run(["sbatch", "--vm", "--parsable", "-o", "/dev/null", "--wrap", "true"], user=slurm_user)
    assert r.returncode == 0, r.stderr
    # and an option nobody registered is still refused: the check is real
    r = testcluster.run(["salloc", "--no-such-option", "--no-shell", "-N1"], user=slurm_user)
    assert r.returncode != 0 and "unrecognized option" in r.stderr
    r = testcluster.run(["srun", "--help"], user=slurm_user)
    assert "--vm" in r.stdout


def test_vm_step_runs_setup_create_then_delete_once_per_node_as_root(testcluster, slurm_user, fake_pcocc):
    uid = str(testcluster.run(["id", "-u"], user=slurm_user).stdout.strip())
    # 2 tasks per node: setup still runs once per node
    r = testcluster.run(["srun", "--vm", "-N2", "--ntasks-per-node=2", "sh", "-c", "echo $SLURM_JOB_ID"], user=slurm_user)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[0]
    # delete runs in the job's epilog, once the job's steps are gone
    wait_for(lambda: len(fake_pcocc(job)) >= 4, what="setup delete on both nodes")
    wait_for(lambda: job_done(testcluster, job), what="the job's epilogs")
    calls = fake_pcocc(job)
    assert len(calls) == 4, calls
    hosts = sorted({c["host"] for c in calls})
    assert len(hosts) == 2
    deadline = str(slurm.TEARDOWN_TIMEOUT - 10)
    for node in hosts:
        mine = [c for c in calls if c["host"] == node]
        assert [c["args"] for c in mine] == [
            ["internal", "setup", "create", "--jobid", job, "--uid", uid, "--tasks-on-node", "2"],
            ["internal", "setup", "delete", "--jobid", job, "--uid", uid, "--deadline", deadline],
        ]
        assert all(c["uid"] == 0 for c in mine)  # root, in slurmstepd, then in the epilog
        # slurmd's own environment, in the epilog too (slurmd gives its epilogs a minimal one)
        assert all(c["env"]["OVS_RUNDIR"] == testcluster.ovs_rundir(node) for c in mine)
        assert all(c["env"]["SLURM_JOB_UID"] == uid for c in mine)
        assert mine[0]["env"]["SLURM_STEP_ID"] == "0" and mine[1]["env"]["SLURM_STEP_ID"] == ""  # the epilog has no step
        assert mine[0]["env"]["PCOCC_TASK_HOME"] == testcluster.run(["sh", "-c", "echo $HOME"], user=slurm_user).stdout.strip()
    # the plugin's marker of a set-up job is gone with the epilog
    for node in testcluster.node_names:
        assert not list(Path(testcluster.node_state_dir(node)).glob(f"spank-{job}.vm"))


def test_scancel_runs_setup_delete_after_the_step_is_gone(testcluster, slurm_user, fake_pcocc):
    (fake_pcocc.dir / "slow-delete").touch()  # a teardown that takes a while: the step's kill must not cut it
    srun = subprocess.Popen(["runuser", "-u", slurm_user, "--", "srun", "--vm", "-N2", "-J", "cancelme", "sleep", "300"],
                            env={**os.environ, **testcluster.env}, cwd="/", stderr=subprocess.PIPE, text=True)
    try:
        job = wait_for(lambda: testcluster.run(["squeue", "-h", "-n", "cancelme", "-t", "R", "-o", "%i"]).stdout.strip(),
                       what="the job to run")
        wait_for(lambda: len(fake_pcocc(job)) == 2, what="setup create on both nodes")
        testcluster.run(["scancel", job], check=True)
        srun.wait(timeout=60)
    finally:
        if srun.poll() is None:
            srun.kill()
        srun.wait()
    wait_for(lambda: job_done(testcluster, job), timeout=120, what="the job's epilogs")
    # the killed tasks are told to pcocc too (task-exit, from the task_exit hook): not the teardown's business
    calls = [c for c in fake_pcocc(job) if c["args"][2] != "task-exit"]
    a, b = sorted({c["host"] for c in calls})
    assert sorted((c["host"], c["args"][2]) for c in calls) == [
        (a, "create"), (a, "delete"), (a, "delete-done"), (b, "create"), (b, "delete"), (b, "delete-done")]


def test_step_without_vm_runs_no_setup(testcluster, slurm_user, fake_pcocc):
    r = testcluster.run(["srun", "-N2", "sh", "-c", "echo $SLURM_JOB_ID"], user=slurm_user, check=True)
    job = r.stdout.split()[0]
    wait_for(lambda: job_done(testcluster, job), what="the job's end")
    assert fake_pcocc(job) == []


def test_failing_setup_fails_the_step_with_its_message(testcluster, slurm_user, fake_pcocc):
    (fake_pcocc.dir / "fail").touch()
    r = testcluster.run(["srun", "--vm", "-N2", "-n2", "sh", "-c", "echo ran; echo $SLURM_JOB_ID >&2"], user=slurm_user)
    assert r.returncode != 0
    assert "ran" not in r.stdout  # no task ran
    hosts = sorted({c["host"] for c in fake_pcocc()})
    assert len(hosts) == 2
    for node in hosts:
        assert f"pcocc: node setup failed on {node}: starting the node's network; no free VXLAN id for this job (fake)" in r.stderr
    # delete runs at once, before the step ends, to undo whatever the failed create made
    deletes = {c["host"] for c in fake_pcocc() if c["args"][2] == "delete" and c["env"]["SLURM_STEP_ID"] == "0"}
    assert sorted(deletes) == hosts


def test_etcd_answers_from_a_node_at_the_bridge_address(testcluster):
    assert testcluster.etcd_endpoint.startswith(f"http://{Layout(testcluster.base, 1).host_ip}:")
    key, value = f"/pcocc-test/{os.getpid()}", "from-node2"
    assert testcluster.env["ETCDCTL_ENDPOINTS"] == testcluster.etcd_endpoint
    r = testcluster.onnode(testcluster.node_names[-1], ["etcdctl", "put", key, value])
    assert r.returncode == 0, r.stderr
    r = testcluster.run(["etcdctl", "get", "--print-value-only", key], check=True)
    assert r.stdout.strip() == value


def test_ovs_answers_in_each_node_namespace(testcluster):
    uuids = set()
    for node in testcluster.node_names:
        r = testcluster.onnode(node, ["ovs-vsctl", "--timeout=5", "show"])
        assert r.returncode == 0, r.stderr
        uuids.add(r.stdout.split()[0])
        # the userspace datapath works (there is no kernel module here)
        testcluster.onnode(node, ["ovs-vsctl", "--timeout=5", "add-br", "tbr", "--", "set", "bridge", "tbr",
                                  "datapath_type=netdev"], check=True)
        assert "tbr" in testcluster.onnode(node, ["ip", "-br", "link"]).stdout
        testcluster.onnode(node, ["ovs-vsctl", "--timeout=5", "del-br", "tbr"], check=True)
    assert len(uuids) == len(testcluster.node_names)  # one OVS per node


def test_onnode_runs_in_the_node_namespaces(testcluster, slurm_user):
    node = testcluster.node_names[-1]
    r = testcluster.onnode(node, ["sh", "-c", "hostname; id -un; ip -br -4 addr show eth0"], user=slurm_user)
    host, user, addr = r.stdout.splitlines()
    assert (host, user) == (node, slurm_user)
    assert testcluster.node_ip(node) in addr


# ---------------------------------------------------------------- up and down, beside the session cluster


@pytest.fixture
def other_base():
    base = Path(f"/tmp/pcocc-tc-pytest-{os.getpid()}-other")
    yield base
    TestCluster(base, install=False).down()  # whatever the test did


def test_a_second_cluster_beside_the_first_and_down_leaves_nothing(testcluster, other_base):
    tc = TestCluster(other_base, nodes=2, ovs=True, install=False)
    tc.up()
    assert tc.layout.subnet != testcluster.layout.subnet and tc.netns("node1") != testcluster.netns("node1")
    user = tc.add_user().pw_name
    r = tc.run(["sbatch", "--parsable", "-N2", "-o", "/dev/null", "--wrap", "srun sleep 300"], user=user, check=True)
    job = r.stdout.strip()
    wait_for(lambda: f"{job}.0" in tc.run(["squeue", "-h", "-s", "-j", job, "-o", "%i"]).stdout, what="step running")
    tc.onnode("node1", ["sh", "-c", "sleep 300 >/dev/null 2>&1 &"])  # a stray, recorded nowhere
    snap = snapshot(tc)
    assert leftovers(snap)  # the check sees a live cluster
    assert tc.down() is True
    assert leftovers(snap) == []
    assert tc.down() is False  # idempotent
    # the session's cluster is untouched: its nodes are (or, once earlier tests' jobs are done, get back to) idle
    idle = {n: "idle" for n in testcluster.node_names}
    wait_for(lambda: slurm.node_states(testcluster.base) == idle, timeout=300, what="the session cluster's nodes idle")


def test_down_after_a_failed_up(other_base, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("slurmd failed (test)")

    tc = TestCluster(other_base, nodes=2, ovs=True, install=False)
    monkeypatch.setattr(slurm, "start_node", broken)
    with pytest.raises(RuntimeError):
        tc.up()
    snap = snapshot(tc)
    assert any(p["name"] == "slurmctld" for p in snap["state"]["processes"])
    assert tc.down() is True
    assert leftovers(snap) == []


def test_down_after_a_crash_in_up(other_base):
    # a process that dies hard once slurmd has started: nothing of its own cleans up
    code = (
        "import os\n"
        "from pcocc.testcluster import TestCluster, slurm\n"
        "slurm.wait_idle = lambda *a, **k: os._exit(9)\n"
        f"TestCluster({str(other_base)!r}, nodes=2, ovs=True, install=False).up()\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 9
    tc = TestCluster(other_base, install=False)
    snap = snapshot(tc)
    assert [p["name"] for p in snap["state"]["processes"]][-2:] == ["slurmd:node1", "slurmd:node2"]
    assert tc.down() is True
    assert leftovers(snap) == []


def test_up_refuses_a_clash(testcluster, other_base):
    with pytest.raises(ClashError, match="already recorded"):
        TestCluster(testcluster.base, install=False).up()
    bridge = Layout(other_base.resolve(), 2).bridge
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        with pytest.raises(ClashError, match=f"network interface {bridge} exists"):
            TestCluster(other_base, install=False).up()
        assert not other_base.exists()  # refused before making anything
    finally:
        subprocess.run(["ip", "link", "del", bridge])


def test_command_line(other_base):
    def cli(*args):
        return subprocess.run([str(TESTCLUSTER), *args, "--base", str(other_base)], capture_output=True, text=True)

    r = cli("up", "--nodes", "1", "--no-ovs", "--no-install", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["nodes"] == {"node1": "idle"} and status["up"]
    assert "ready" in status["timings"]
    env = cli("env").stdout
    assert f"export SLURM_CONF={other_base}/slurm/slurm.conf" in env and "export ETCDCTL_ENDPOINTS=http://" in env
    r = subprocess.run(["sh", "-c", env + "srun -N1 hostname"], capture_output=True, text=True)
    assert r.stdout.strip() == "node1", r.stderr
    assert "node1      idle" in cli("status").stdout
    r = cli("up", "--no-install")
    assert r.returncode != 0 and "already recorded" in r.stderr
    assert cli("down").returncode == 0
    assert not other_base.exists()
    r = cli("down")
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert cli("env").returncode != 0
