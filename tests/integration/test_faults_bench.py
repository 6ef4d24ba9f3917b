"""The fault-injection bench (bench/faults.py) keeps working: a few cycles with a fixed seed,
each fault kind of each backend once (local; SLURM on the bench's own test cluster with its
3-member etcd), and nothing left after any of them.

The 200-cycle runs stay in the bench (bench/results/faults.md); here a handful of cycles
prove that the bench's faults, checks and counts still fit the code (a renamed record
field or state would make them fail loudly rather than count nothing).
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("faults_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def bench():
    if os.geteuid() != 0:
        pytest.skip("the faults bench runs as root (a network namespace, Open vSwitch, node setup)")
    return load_bench()


def test_local_cycles_leave_nothing(bench, tmp_path, tiny_image):
    faults = bench.LOCAL_FAULTS
    # one cycle per fault kind (the draw of each cycle's timing stays seeded)
    status = bench.main(["--backend", "local", "--cycles", str(len(faults)), "--seed", "12",
                         "--each", "--out", str(tmp_path)])
    assert_each_kind_left_nothing(tmp_path, "local", faults, status)
    assert "| **all** |" in (tmp_path / "faults.md").read_text()


def assert_each_kind_left_nothing(out, backend, faults, status):
    """The bench's results in out: every kind of faults run once, no failed check, nothing left."""
    data = json.loads((out / "faults.json").read_text())["backends"][backend]
    assert data["cycles_run"] == len(faults)
    assert sorted(data["kinds"]) == sorted(faults)
    assert data["failures"] == [], data["failures"]
    assert data["leaks"] == [], data["leaks"]
    for kind, k in data["kinds"].items():
        assert all(n == 0 for n in k["leftovers"].values()), (kind, k["leftovers"])
    assert status == 0


def test_the_counts_see_a_live_cluster(bench, tmp_path, tiny_image):
    """A count of 0 means something only if the same count sees a running cluster's objects."""
    b = bench.LocalBench(tmp_path / "w")
    try:
        jobid = b.submit(wait=True)
        seen = b.count(jobid)
        for what in ("processes", "run dirs", "overlays", "devices", "ovs bridges", "ovs ports", "netns",
                     "iptables rules", "dnsmasq", "undo logs", "store keys", "pool entries", "reservations"):
            assert seen[what], f"the count sees no {what} of a running cluster: {seen}"
        b._cancel(jobid)
        assert not any(b.count(jobid).values())
        assert b.history(jobid) == 1  # how it ended is kept, and counted apart
    finally:
        b.close()


def test_slurm_cycles_leave_nothing(bench, tmp_path, tiny_image):
    """Each SLURM fault kind once (issue 12, section 6: the tests hit every kind): cancel during
    the start, scancel during node setup, SIGKILL of the launcher, of node setup, of qemu, of
    the VM task and of the CLI, Ctrl-C of batch --wait, slurmd restarted, one etcd member of
    three killed. The bench brings its own test cluster, so the session's cluster is not touched."""
    faults = bench.SLURM_FAULTS
    status = bench.main(["--backend", "slurm", "--cycles", str(len(faults)), "--seed", "13",
                         "--each", "--out", str(tmp_path)])
    assert_each_kind_left_nothing(tmp_path, "slurm", faults, status)
