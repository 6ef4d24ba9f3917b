"""Cluster-wide allocations by compare-and-swap, on SQLite and on a real etcd."""

import threading

import pytest
from store_fixtures import connect, etcd_server, store  # noqa: F401 - fixtures

from pcocc.allocator import Pool
from pcocc.errors import ResourceError


def test_allocate_release_and_exhaustion(store):
    pool = Pool(store, "vxlan", 100, 104)
    assert pool.allocate("job1", 2) == [100, 101]
    assert pool.allocate("job1", 2) == [100, 101]  # idempotent for its owner
    assert pool.allocate("job2", 3) == [102, 103, 104]
    with pytest.raises(ResourceError, match="no free vxlan left"):
        pool.allocate("job3")
    pool.release("job1")
    assert pool.allocate("job3", 2) == [100, 101]
    assert pool.owners() == {100: "job3", 101: "job3", 102: "job2", 103: "job2", 104: "job2"}


def test_dead_jobs_are_reclaimed(store):
    pool = Pool(store, "pkeys", 1, 3)
    pool.allocate("11", 3)
    with pytest.raises(ResourceError):
        pool.allocate("12", alive=lambda owner: True)
    assert pool.allocate("12", alive=lambda owner: owner != "11") == [1]
    assert pool.owners() == {1: "12"}


def test_concurrent_allocations_are_unique(connect):
    results, errors = {}, []

    def worker(n):
        try:
            results[n] = Pool(connect(), "ports", 1000, 1999).allocate(f"job{n}", 5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = [i for r in results.values() for i in r]
    assert len(ids) == 40 and len(set(ids)) == 40
