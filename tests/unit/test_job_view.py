"""Waiting for a cluster through the store's watch (JobView): the records are read once, then
only what changes; the launcher's wait_started and Backend.wait_ready built on it, on SQLite and
on a real etcd. No assertion on time: the waits end on content."""

import threading
from types import SimpleNamespace

import pytest
from store_fixtures import connect, etcd_server, store  # noqa: F401 - fixtures

from pcocc import state
from pcocc.batch.base import Backend, JobView
from pcocc.errors import PcoccError
from pcocc.lifecycle import launcher

USER, JOB = "alice", 42
PREFIX = state.cluster_prefix(USER, JOB)


def _info(n):
    return {"jobid": JOB, "name": "c", "state": "submitted", "templates": {"a": {}}, "layout": [["a", n]]}


def _vm(rank, status, **extra):
    return {"rank": rank, "name": f"vm{rank}", "state": status, **extra}


class _Backend(Backend):
    def __init__(self, store):
        super().__init__(SimpleNamespace(env=SimpleNamespace(user=USER), store=store))

    def job_alive(self, jobid):
        return True


def test_the_view_counts_states_as_they_change(store, connect):
    other = connect()
    other.put(PREFIX + "info", _info(3))
    other.put(PREFIX + "vms/0", _vm(0, "starting"))
    with JobView(store, USER, JOB) as view:
        assert view.count() == 3 and view.counts() == {"starting": 1, "pending": 2} and view.started() == 0
        other.put(PREFIX + "vms/0", _vm(0, "running"))
        other.put(PREFIX + "vms/2", _vm(2, "qemu-start"))
        other.put(state.node_key(USER, JOB, "n1"), {"state": "failed", "error": "no bridge"})
        while view.counts() != {"running": 1, "qemu-start": 1, "pending": 1} or not view.failed_node():
            assert view.refresh(5), "no change told within 5 s"
        assert view.started() == 1 and view.started("qemu") == 2
        assert view.failed_node() == ("n1", {"state": "failed", "error": "no bridge"})
        assert [v["state"] for v in view.vms()] == ["running", "pending", "qemu-start"]
        assert view.first_vm(("failed", "stopped")) is None
        other.delete(PREFIX + "vms/0")
        other.put(PREFIX + "vms/2", _vm(2, "failed", error="qemu died"))
        while view.counts() != {"failed": 1, "pending": 2}:
            assert view.refresh(5), "no change told within 5 s"
        assert view.first_vm(("failed", "stopped"))["error"] == "qemu died"


def test_wait_started_follows_the_vms_without_reading_the_cluster_again(store, connect, monkeypatch):
    """On etcd the cluster's keys are read once (the view's first read), then watched."""
    other = connect()
    other.put(PREFIX + "info", _info(4))
    reads = []
    if hasattr(store, "_range"):
        real = store._range
        monkeypatch.setattr(store, "_range", lambda prefix, stale_ok=False: reads.append(prefix) or real(prefix, stale_ok))

    def vms_start():
        for rank in range(4):
            for status in ("starting", "qemu-start", "running"):
                other.put(PREFIX + f"vms/{rank}", _vm(rank, status))

    seen = []
    publisher = threading.Thread(target=vms_start)
    publisher.start()
    try:
        failed = launcher.wait_started(_Backend(store), JOB, lambda vms: seen.append([v["state"] for v in vms]),
                                       alive=lambda: True, timeout=60)
    finally:
        publisher.join()
    assert failed == [] and seen[-1] == ["running"] * 4
    if hasattr(store, "_range"):
        assert reads == [PREFIX]


def test_wait_started_returns_the_vms_that_ended_and_raises_when_all_did(store):
    store.put(PREFIX + "info", _info(3))
    for rank, status in enumerate(("running", "failed", "qemu-start")):
        store.put(PREFIX + f"vms/{rank}", _vm(rank, status, error="boom"))
    failed = launcher.wait_started(_Backend(store), JOB, lambda vms: None, alive=lambda: True, until="qemu")
    assert [v["rank"] for v in failed] == [1]
    for rank in range(3):
        store.put(PREFIX + f"vms/{rank}", _vm(rank, "stopped" if rank else "failed", error="boom"))
    with pytest.raises(PcoccError, match=r"every VM ended before it ran \(vm0: boom\)"):
        launcher.wait_started(_Backend(store), JOB, lambda vms: None, alive=lambda: True)
    store.put(state.node_key(USER, JOB, "n2"), {"state": "failed", "error": "no bridge"})
    with pytest.raises(PcoccError, match="node setup failed on n2: no bridge"):
        launcher.wait_started(_Backend(store), JOB, lambda vms: None, alive=lambda: True)


def test_wait_ready_waits_for_the_record_then_every_vm(store, connect):
    other = connect()
    told, warned = [], []

    def later():
        other.put(PREFIX + "info", _info(2))
        other.put(PREFIX + "vms/0", _vm(0, "running", agent="none", agent_error="no agent"))
        other.put(PREFIX + "vms/1", _vm(1, "running"))

    publisher = threading.Thread(target=later)
    publisher.start()
    try:
        _Backend(store).wait_ready(JOB, progress=lambda n, total, vms: told.append((n, total)), timeout=60, warn=warned.append)
    finally:
        publisher.join()
    assert told[-1] == (2, 2)
    assert len(warned) == 1 and warned[0].startswith("vm0 runs without a guest agent")
    other.put(PREFIX + "vms/1", _vm(1, "failed", error="qemu died"))
    with pytest.raises(PcoccError, match="vm1 failed: qemu died"):
        _Backend(store).wait_ready(JOB, timeout=60)
