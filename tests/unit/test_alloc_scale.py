"""Id pools at scale, at sizes that run in CI: many allocators at once, nearly full pools,
the migration of the former single-key tables, dead owners' ids reclaimed. On SQLite and
on a real etcd (store_fixtures). Every check is on uniqueness and content, never on time."""

import threading

import pytest
from store_fixtures import connect, etcd_server, store  # noqa: F401 - fixtures

from pcocc import allocator, state
from pcocc.allocator import Pool
from pcocc.errors import ResourceError


def run_threads(n, body):
    """body(i) in n threads started together; [(i, result or None, error or None)]."""
    out = [None] * n
    start = threading.Barrier(n)

    def one(i):
        try:
            start.wait()
            out[i] = (i, body(i), None)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out[i] = (i, None, f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def check_layout(store, name):
    """The pool's keys are consistent: each id key's owner lists it, each owner key's ids
    name it, and the former table is gone. Returns {id: owner}."""
    ids = Pool(store, name, 0, 0).owners()
    owners = {v["owner"]: v["ids"] for v in store.range(f"{allocator.OWNERS}{name}/").values()}
    assert store.get(state.pool_key(name)) is None
    assert {i: o for o, got in owners.items() for i in got} == ids
    assert all(got == sorted(got) and got for got in owners.values())
    return ids


def test_200_allocators_at_once_get_unique_ids(connect):
    """200 allocators (threads, each its own connection) take 4 ids each from a large pool
    (random probing) and 1 from a pool of 256 (scanned, 200 of 256 taken at the end)."""
    stores = [connect() for _ in range(200)]

    def body(i):
        big = Pool(stores[i], "extip-scale", 1, 65534).allocate(f"{i}:net:host{i}", 4)
        small = Pool(stores[i], "hostport-n0", 40000, 40255).allocate(f"{i}:net:n0", 1)
        return big, small

    results = run_threads(200, body)
    assert [e for _, _, e in results if e] == []
    big = {f"{i}:net:host{i}": r[0] for i, r, _ in results}
    small = {f"{i}:net:n0": r[1] for i, r, _ in results}
    assert all(len(got) == 4 for got in big.values()) and all(len(got) == 1 for got in small.values())
    assert check_layout(stores[0], "extip-scale") == {i: o for o, got in big.items() for i in got}
    assert check_layout(stores[0], "hostport-n0") == {i: o for o, got in small.items() for i in got}


def test_every_node_of_a_job_gets_the_jobs_one_id(connect):
    """The VNI of a job: its 20 nodes allocate for the same owner at once, 10 jobs together:
    one id per job, the same on every node, none shared between jobs."""
    stores = [connect() for _ in range(200)]
    results = run_threads(200, lambda i: Pool(stores[i], "vxlan", 1000, 16_000_000).allocate(f"{i % 10}:priv"))
    assert [e for _, _, e in results if e] == []
    per_job = {}
    for i, got, _ in results:
        per_job.setdefault(i % 10, set()).add(tuple(got))
    assert all(len(v) == 1 for v in per_job.values())
    vnis = {job: v.pop()[0] for job, v in per_job.items()}
    assert check_layout(stores[0], "vxlan") == {vni: f"{job}:priv" for job, vni in vnis.items()}


def test_a_nearly_full_small_pool_gives_exactly_what_is_left(connect):
    """A node's 100 reverse-NAT ports, 95 taken: 10 allocators race for one each, exactly 5 win."""
    first = connect()
    pool = Pool(first, "hostport-n1", 41000, 41099)
    for j in range(19):
        assert pool.allocate(f"{j}:net:n1", 5) == list(range(41000 + 5 * j, 41005 + 5 * j))  # lowest first
    stores = [connect() for _ in range(10)]
    results = run_threads(10, lambda i: Pool(stores[i], "hostport-n1", 41000, 41099).allocate(f"{100 + i}:net:n1", 1, alive=lambda o: True))
    won = [got for _, got, e in results if not e]
    assert sorted(i for got in won for i in got) == list(range(41095, 41100))
    assert sorted(e for _, _, e in results if e) == ["ResourceError: no free hostport-n1 left (41000-41099: 100 in use)"] * 5
    assert len(check_layout(first, "hostport-n1")) == 100


def test_a_nearly_full_large_pool_falls_back_to_a_scan(store, monkeypatch):
    """Probing a pool too large to scan at once, almost full: the allocator turns to one range
    read and finds the last free ids; then the pool says it is full."""
    pool = Pool(store, "pkey", 1, 2000)  # above SCAN_SIZE: probed
    assert pool.size > allocator.SCAN_SIZE
    for j in range(20):
        got = pool.allocate(f"{j}:ib", 99)
        assert len(got) == 99
    got = pool.allocate("99:ib", 20)
    held = [i for o, ids in ((o, pool.held(o)) for o in {*map(str, pool.owners().values())}) for i in ids]
    assert len(got) == 20 and len(set(held)) == len(held) == 2000
    with pytest.raises(ResourceError, match="no free pkey left"):
        pool.allocate("100:ib", 1)
    assert len(check_layout(store, "pkey")) == 2000


def test_batches_larger_than_one_transaction(store):
    """An owner that needs more ids than one transaction may write (etcd's 128 operations)."""
    pool = Pool(store, "extip-big", 1, 65534)
    got = pool.allocate("5:net:host", 300)
    assert len(set(got)) == 300 and got == sorted(got)
    assert pool.allocate("5:net:host", 300) == got
    pool.release("5:net:host")
    assert pool.owners() == {} and store.range(allocator.OWNERS) == {}


def test_the_former_table_is_migrated_once_under_concurrency(connect):
    """A table written by the former code: 16 processes' worth of callers meet it at once
    (allocations, releases as the undo log makes them, reads); every entry moves exactly once."""
    first = connect()
    old = {str(i): f"{i % 37}:net:host{i % 37}" for i in range(1, 1501)}  # 1,500 ids, 37 owners
    first.put(state.pool_key("extip-old"), old)
    stores = [connect() for _ in range(16)]

    def body(i):
        pool = Pool(stores[i], "extip-old", 1, 65534)
        if i == 0:
            pool.release("3:net:host3")  # an undo log from before the upgrade
            return None
        if i == 1:
            return pool.owners()
        return pool.allocate(f"{100 + i}:net:x", 5)

    results = run_threads(16, body)
    assert [e for _, _, e in results if e] == []
    expected = {int(i): o for i, o in old.items() if o != "3:net:host3"}
    for i, got, _ in results[2:]:
        expected.update({x: f"{100 + i}:net:x" for x in got})
    assert all(int(k) not in {x for _, g, _ in results[2:] for x in g} for k in old if old[k] != "3:net:host3")
    assert check_layout(first, "extip-old") == expected
    assert Pool(first, "extip-old", 1, 65534).held("4:net:host4") == sorted(int(i) for i, o in old.items() if o == "4:net:host4")


def test_an_undo_log_from_before_the_migration_releases_its_ids(store):
    """Undo logs name a pool and an owner (jobnet's "pool" and "pool-own" entries): the
    release that replays them works on a table the former code wrote."""
    store.put(state.pool_key("vxlan"), {"1000": "5:priv", "1001": "6:priv"})
    Pool(store, "vxlan", 0, 0).release("5:priv")  # as jobnet.undo_actions calls it
    assert Pool(store, "vxlan", 0, 0).owners() == {1001: "6:priv"}
    assert store.get(state.pool_key("vxlan")) is None


def test_dead_owners_are_reclaimed_by_the_sweep(store, monkeypatch):
    """A job that ended without its teardown: the next allocation whose sweep is due releases
    its ids (every SWEEP_PERIOD; here due at once), whatever pool size."""
    pool = Pool(store, "vxlan", 1000, 16_000_000)
    dead_ids = pool.allocate("7:priv")
    pool.allocate("8:priv", alive=lambda o: True)  # the first sweep: nobody dead
    assert set(pool.owners().values()) == {"7:priv", "8:priv"}
    pool.allocate("9:priv", alive=lambda o: not o.startswith("7:"))  # not due yet: within SWEEP_PERIOD
    assert "7:priv" in pool.owners().values()
    monkeypatch.setattr(allocator, "SWEEP_PERIOD", 0.0)
    got = pool.allocate("10:priv", alive=lambda o: not o.startswith("7:"))
    owners = pool.owners()
    assert "7:priv" not in owners.values() and owners[got[0]] == "10:priv" and dead_ids[0] not in owners
    assert allocator.sweep(store, lambda o: not o.startswith("8:")) == {"vxlan": ["8:priv"]}
    assert sorted(check_layout(store, "vxlan").values()) == ["10:priv", "9:priv"]


def test_a_probe_that_meets_a_dead_owner_reclaims_it(store, monkeypatch):
    """Probing hits an id of a dead job: that job's ids are released and the id is taken."""
    pool = Pool(store, "extip-probe", 1, 2000)
    pool.allocate("1:net:a", 1)
    (dead,) = pool.owners()
    picks, real = [dead, dead], allocator.random.randint  # the dead owner's id, and again once it is freed
    monkeypatch.setattr(allocator.random, "randint", lambda a, b: picks.pop(0) if picks else real(a, b))
    store.put(allocator.sweep_key("extip-probe"), {"at": 4e9})  # no sweep: the probe does it
    got = pool.allocate("2:net:b", 1, alive=lambda o: o != "1:net:a")
    assert got == [dead] and check_layout(store, "extip-probe") == {dead: "2:net:b"}


def test_ids_hold_no_lease(store):
    """An etcd outage longer than any TTL must not free a running job's id: its keys have no lease."""
    from pcocc.store.sqlite import SqliteStore

    Pool(store, "vxlan", 1000, 2000).allocate("5:priv", alive=lambda o: True)
    if isinstance(store, SqliteStore):
        assert store.db.execute("SELECT count(*) FROM kv WHERE expires IS NOT NULL").fetchone()[0] == 0
        return
    import base64

    from pcocc.store.etcd import range_of

    kvs = store.client.call("kv/range", range_of("/pcocc/global/"))["kvs"]
    assert kvs and all("lease" not in kv for kv in kvs), [base64.b64decode(kv["key"]) for kv in kvs if "lease" in kv]


class ResendingStore:
    """A store whose every transaction is sent twice, as the etcd client does when a leader
    change hides whether the first one was applied."""

    def __init__(self, inner):
        self.inner = inner

    def transact(self, expect, writes, reads=()):
        self.inner.transact(expect, writes, reads)
        return self.inner.transact(expect, writes, reads)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_transaction_applied_twice_changes_nothing(store):
    twice = ResendingStore(store)
    pool = Pool(twice, "extip-twice", 1, 65534)
    got = pool.allocate("5:net:h", 3, alive=lambda o: True)
    assert pool.allocate("5:net:h", 3) == got and check_layout(store, "extip-twice") == dict.fromkeys(got, "5:net:h")
    vni = Pool(twice, "vxlan", 1000, 1010).allocate("5:priv")
    assert vni == [1000] and Pool(store, "vxlan", 0, 0).owners() == {1000: "5:priv"}
    pool.release("5:net:h")
    assert check_layout(store, "extip-twice") == {}


def test_a_nodes_ids_are_drawn_as_one_aligned_block(store):
    """Several ids of one owner from a probed pool: an aligned block when it is free (owners
    of the same count tile the pool: a draw meets another's block whole, or not at all)."""
    pool = Pool(store, "extip-blocks", 1, 65534)
    got = pool.allocate("1:net:h", 16)  # a fresh pool: the first block drawn is free
    assert got == list(range(got[0], got[0] + 16)) and (got[0] - 1) % 16 == 0
    for n in range(2, 21):  # the next ones too unless they drew a taken block: unique in any case
        pool.allocate(f"{n}:net:h", 16)
    assert len(check_layout(store, "extip-blocks")) == 320
