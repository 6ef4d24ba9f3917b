"""Cluster-wide allocations by compare-and-swap, on SQLite and on a real etcd."""

import multiprocessing
import queue
import threading

import pytest
from store_fixtures import connect, etcd_server, store  # noqa: F401 - fixtures

from pcocc.allocator import Pool
from pcocc.errors import ResourceError
from pcocc.store.sqlite import SqliteStore


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


# -- many processes at once

PROCESSES = 32
ALLOCATIONS = 2  # per process, for two owners: 64 updates of one key in all (< Store.update's 100 tries)
IDS = 3  # per allocation


def _open_spec(spec):
    kind, where = spec
    if kind == "sqlite":
        return SqliteStore(where)
    from pcocc.store.etcd import EtcdStore

    return EtcdStore([where])


def _allocating_process(spec, n, ready, go, results):
    """One process: open its own store once every process is ready, allocate, report."""
    ready.put(n)
    go.wait()
    try:
        store = _open_spec(spec)  # at once with the others: on SQLite, the file's creation race too
        pool = Pool(store, "ports", 10000, 19999)
        got = {f"job{n}-{k}": pool.allocate(f"job{n}-{k}", IDS) for k in range(ALLOCATIONS)}
        store.close()
        results.put((n, got, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((n, None, f"{type(exc).__name__}: {exc}"))


def _collect(q, count, procs, what, none_may_exit=False):
    """count items from q; fails (rather than hangs) when no more can come: a process exited
    before its item (none_may_exit: any exit is one), or every process is gone."""
    items = []
    while len(items) < count:
        try:
            items.append(q.get(timeout=1))  # a poll of the processes' liveness, not a deadline
        except queue.Empty:
            dead = [(p.pid, p.exitcode) for p in procs if not p.is_alive()]
            if (none_may_exit and dead) or len(dead) == len(procs):
                pytest.fail(f"{what}: processes (pid, exit code) {dead} ended early; {len(items)}/{count} received")
    return items


def test_32_processes_allocate_unique_ids(store):
    """32 processes (not threads: each its own connection, locks and caches) allocate from one
    pool at the same moment, against SQLite (fresh file: creation, WAL switch, every transaction
    race too) and a real etcd: no error, no id twice, and the pool holds exactly what they got.
    Nothing depends on timing: the processes start together and the test waits for all."""
    if isinstance(store, SqliteStore):
        store.close()
        import os

        os.unlink(store.path)  # each process creates it: the creation race is part of the test
        for suffix in ("-wal", "-shm"):
            if os.path.exists(store.path + suffix):
                os.unlink(store.path + suffix)
        spec = ("sqlite", store.path)
    else:
        spec = ("etcd", store.client.urls[0])
    ctx = multiprocessing.get_context("forkserver")  # no fork of this (threaded) pytest process
    ctx.set_forkserver_preload(["pytest", "pcocc.allocator", "pcocc.store.sqlite", "pcocc.store.etcd"])  # once, not per child
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_allocating_process, args=(spec, n, ready, go, results)) for n in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        _collect(ready, PROCESSES, procs, "start", none_may_exit=True)
        go.set()
        reported = _collect(results, PROCESSES, procs, "results")
    finally:
        go.set()  # never leave one waiting
        for p in procs:
            p.join()
    errors = [f"process {n}: {err}" for n, _, err in reported if err]
    assert not errors, "\n".join(errors)
    owners = {owner: ids for _, got, _ in reported for owner, ids in got.items()}
    ids = [i for got in owners.values() for i in got]
    assert len(owners) == PROCESSES * ALLOCATIONS and all(len(got) == IDS for got in owners.values())
    assert len(set(ids)) == len(ids) == PROCESSES * ALLOCATIONS * IDS
    check = _open_spec(spec)
    try:
        assert Pool(check, "ports", 10000, 19999).owners() == {i: owner for owner, got in owners.items() for i in got}
    finally:
        check.close()
