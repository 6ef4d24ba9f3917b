"""The real multi-node test cluster as a session fixture (pcocc.testcluster).

tests/integration/conftest.py imports the fixtures once (imported into each
module, each module would get its own "session" cluster). In a test module:

    pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

    def test_x(testcluster, slurm_user):
        r = testcluster.run(["srun", "-N2", "hostname"], user=slurm_user)

The xdist group keeps every module that uses it on one worker, so the session
starts one cluster. PCOCC_TEST_NODES sets the node count (default 2).
"""

import glob
import json
import os
import shutil
from pathlib import Path

import pytest

from pcocc.testcluster import TestCluster
from pcocc.testcluster import proc as tc_proc

BASE_PREFIX = "/tmp/pcocc-tc-pytest-"


def _sweep_stale():
    """Take down clusters of earlier sessions that died before their teardown."""
    for path in glob.glob(BASE_PREFIX + "*/state.json"):
        try:
            owner = json.loads(Path(path).read_text()).get("owner_pid")
        except (OSError, ValueError):
            continue
        if owner and not tc_proc.alive(owner):
            TestCluster(Path(path).parent, install=False).down()


def snapshot(tc):
    """What tc has made, read before down(), for leftovers() to check afterwards."""
    state = json.loads((tc.base / "state.json").read_text())
    inodes = {}
    for ns in state["netns"]:
        try:
            inodes[ns] = os.stat(f"/run/netns/{ns}").st_ino
        except FileNotFoundError:
            pass
    return {"state": state, "netns_inodes": inodes}


def leftovers(snap):
    """Everything of a snapshot that still exists: processes, namespaces, links, mounts, files, users."""
    state, base = snap["state"], snap["state"]["base"]
    found = []
    for p in state["processes"]:
        if p["pid"] and tc_proc.alive(p["pid"]) and tc_proc.process_start_time(p["pid"]) == p.get("start"):
            found.append(f"process {p['name']} pid {p['pid']}")
    inodes = set(snap["netns_inodes"].values())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes and tc_proc.alive(int(pid)):
                found.append(f"process {pid} in a node namespace")
            elif base.encode() in open(f"/proc/{pid}/cmdline", "rb").read() and tc_proc.alive(int(pid)):
                found.append(f"process {pid} names {base}")
        except OSError:
            continue
    found += [f"netns {ns}" for ns in state["netns"] if os.path.lexists(f"/run/netns/{ns}")]
    found += [f"link {link}" for link in state["links"] if os.path.lexists(f"/sys/class/net/{link}")]
    names = [base, *state["netns"]]
    for mounts in ("/proc/self/mountinfo", "/proc/1/mountinfo"):
        with open(mounts) as f:
            found += [f"mount {line.split()[4]}" for line in f if any(n in line for n in names)]
    if os.path.lexists(base):
        found.append(f"directory {base}")
    found += [f"user {u}" for u in state["users"] if _user_exists(u)]
    return found


def _user_exists(name):
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def testcluster():
    """A running cluster (munge, etcd, slurmctld, N slurmd nodes in netns, OVS per node, the SPANK plugin).

    Its unprivileged user is `testcluster.user`; everything is taken down at the end, also on failure.
    """
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (network namespaces, bridges, daemons)")
    _sweep_stale()
    nodes = int(os.environ.get("PCOCC_TEST_NODES", "2"))
    tc = TestCluster(f"{BASE_PREFIX}{os.getpid()}", nodes=nodes, log=lambda line: print(line, flush=True))
    if (tc.base / "state.json").exists():  # a second instance of this fixture: never take down the first's
        pytest.fail(f"a test cluster already runs in {tc.base}: import the fixture from conftest.py only")
    snap, user_files = None, []
    try:
        tc.up()
        entry = tc.add_user()  # recorded: down() removes it
        tc.user = entry.pw_name
        user_files = [f"/tmp/pcocc-{entry.pw_uid}", f"/tmp/pcocc-accel-{entry.pw_uid}.json"]  # its VMs' run dir and cache
        snap = snapshot(tc)
        print(f"test cluster {tc.id} up in {tc.timings['ready']:.2f} s ({nodes} nodes, base {tc.base})")
        yield tc
    finally:
        snap = snap or (snapshot(tc) if (tc.base / "state.json").exists() else None)
        tc.down()
        for path in user_files:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else Path(path).unlink(missing_ok=True)
        print(f"test cluster {tc.id} down in {tc.timings.get('down', 0):.2f} s")
    remaining = leftovers(snap) if snap else []
    assert not remaining, f"test cluster left behind: {remaining}"


@pytest.fixture(scope="session")
def slurm_user(testcluster):
    """The unprivileged user that submits jobs to the test cluster."""
    return testcluster.user


def kill_setup_midway(tc, node, jobid, uid, shim_name, shim_script, made, what, tmp_path):
    """Run `pcocc internal setup create` for jobid on node with a shim of one tool (which hangs),
    and SIGKILL it (its whole group) once made() is true: a setup killed half-way."""
    import contextlib
    import signal
    import subprocess

    from waiting import wait_for

    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / shim_name).write_text(shim_script)
    (shim / shim_name).chmod(0o755)
    env = {**os.environ, **tc.env, **tc.node_env(node), "PATH": f"{shim}:{os.environ['PATH']}"}
    setup = subprocess.Popen([*tc.enter_argv(node), tc.pcocc, "internal", "setup", "create", "-j", str(jobid),
                              "--uid", str(uid), "--ranks", "0", "--nodes", node],
                             env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: made() or setup.poll() is not None, timeout=60, what=what)
        assert setup.poll() is None, setup.stdout.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(setup.pid, signal.SIGKILL)
        setup.wait()
