"""Store contract: the semantics every backend keeps, on SQLite and on a real etcd."""

import threading
import time

import pytest
from store_fixtures import connect, etcd_server, store  # noqa: F401 - fixtures

from pcocc.store import StoreError
from pcocc.store.sqlite import SqliteStore


def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_put_get_range_delete(store):
    assert store.get("/a") is None
    store.put("/p/1", {"x": 1})
    store.put("/p/2", [1, 2])
    store.put("/q/1", "other")
    assert store.get("/p/1") == {"x": 1}
    assert store.range("/p/") == {"/p/1": {"x": 1}, "/p/2": [1, 2]}
    assert store.delete("/p/1") and not store.delete("/p/1")
    assert store.delete_prefix("/p/") == 1
    assert store.range("/p/") == {} and store.get("/q/1") == "other"


def test_reads_that_may_lag_see_what_one_connection_wrote(store):
    """stale_ok reads (etcd: serializable, from the member asked) see at least what was
    written before on the same connection once it has settled; a single member: at once."""
    store.put("/s/1", {"x": 1})
    assert store.get("/s/1", stale_ok=True) == {"x": 1}
    assert store.range("/s/", stale_ok=True) == {"/s/1": {"x": 1}}
    assert store.get("/s/2", stale_ok=True) is None


def test_range_is_sorted_and_exact_on_prefix(store):
    for key in ("/u/b/2", "/u/b/1", "/u/b0", "/u/bb", "/u/a", "/u/b/é"):
        store.put(key, key)
    assert list(store.range("/u/b/")) == ["/u/b/1", "/u/b/2", "/u/b/é"]
    assert store.delete_prefix("/u/b/") == 3
    assert sorted(store.range("/u/")) == ["/u/a", "/u/b0", "/u/bb"]


def test_values_round_trip_as_json(store):
    value = {"s": "é\n\"", "n": None, "f": 1.5, "l": [True, False], "big": 2**60}
    store.put("/v", value)
    assert store.get("/v") == value
    store.put("/v", None)  # JSON null is a value, not an absence
    assert store.range("/v") == {"/v": None}


def test_create_and_replace_are_compare_and_swap(store):
    assert store.create("/k", 1)
    assert not store.create("/k", 2)
    assert store.get("/k") == 1
    assert not store.replace("/k", 5, 6)
    assert store.replace("/k", 1, 2) and store.get("/k") == 2
    assert store.replace("/k", 2, None) and store.get("/k") is None
    assert not store.replace("/k", 2, 3)
    assert store.replace("/k", None, 7) and store.get("/k") == 7
    assert not store.replace("/k", None, 8)
    assert store.replace("/k", 7, {"a": [1]}) and store.replace("/k", {"a": [1]}, "s")


def test_transact_compares_and_writes_several_keys_at_once(store):
    store.put("/t/a", {"owner": "x"})
    # every expectation holds: the writes are made (None deletes), the reads come back
    done, current = store.transact({"/t/a": {"owner": "x"}, "/t/b": None}, {"/t/b": 1, "/t/a": None}, reads=["/t/c"])
    assert done and current == {"/t/c": None}
    assert store.range("/t/") == {"/t/b": 1}
    # one fails: nothing is written, and the current value of every expected and read key comes back
    store.put("/t/c", "seen")
    done, current = store.transact({"/t/b": 1, "/t/a": None, "/t/d": None, "/t/e": 5}, {"/t/x": 1, "/t/y": 2}, reads=["/t/c"])
    assert not done and current == {"/t/b": 1, "/t/a": None, "/t/d": None, "/t/e": None, "/t/c": "seen"}
    assert store.get("/t/x") is None and store.get("/t/y") is None
    store.put("/t/a", None)  # JSON null is present: it does not meet "absent"
    assert not store.transact({"/t/a": None}, {"/t/z": 1})[0]
    assert store.transact({}, {"/t/z": 1})[0] and store.get("/t/z") == 1  # no expectation: always done
    assert store.transact({"/t/z": 1}, {})[0]  # and no write: a consistent check


def test_transact_refuses_what_etcd_refuses(store):
    from pcocc.store import MAX_TXN_OPS

    with pytest.raises(StoreError, match="exceeds the limit of 128"):
        store.transact({f"/l/{i}": None for i in range(MAX_TXN_OPS + 1)}, {})
    with pytest.raises(StoreError, match="exceeds the limit"):
        store.transact({}, {f"/l/{i}": 1 for i in range(MAX_TXN_OPS)}, reads=["/r"])
    with pytest.raises(StoreError, match="twice"):
        store.transact({}, {"/l/1": 1}, reads=["/l/1"])
    done, _ = store.transact({f"/l/{i}": None for i in range(MAX_TXN_OPS)}, {f"/l/{i}": i for i in range(MAX_TXN_OPS)})
    assert done and len(store.range("/l/")) == MAX_TXN_OPS


def test_transact_is_atomic_under_contention(store, connect):
    """Threads race to take the same keys, a batch each: every key is taken once, and no
    batch is taken in part."""
    won = {}

    def worker(n):
        s = connect()
        for batch in range(20):
            keys = [f"/c/{(batch * 3 + k) % 30}" for k in range(3)]
            if s.transact({k: None for k in keys}, {k: n for k in keys})[0]:
                won.setdefault(n, []).append(keys)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = store.range("/c/")
    for n, batches in won.items():
        for keys in batches:
            assert all(taken[k] == n for k in keys)
    assert sum(len(b) for b in won.values()) * 3 == len(taken) == 30


def test_transact_compares_json_not_bytes(store):
    """A value written by another tool (different spacing or key order) still meets an
    expectation equal as JSON."""
    if isinstance(store, SqliteStore):
        store.db.execute("INSERT INTO kv VALUES ('/j', '{ \"b\": 1, \"a\": [1, 2] }', NULL)")
    else:
        store.client.call("kv/put", {"key": _b64("/j"), "value": _b64('{ "b": 1, "a": [1, 2] }')})
    assert store.transact({"/j": {"a": [1, 2], "b": 1}}, {"/j": "new"})[0]
    assert store.get("/j") == "new"


def _b64(text):
    import base64

    return base64.b64encode(text.encode()).decode()


def test_revision_grows_with_changes(store):
    first = store.revision()
    store.put("/r", 1)
    second = store.revision()
    assert second > first
    store.get("/r")
    assert store.revision() == second


def test_ttl_expires(store):
    # etcd counts leases in whole seconds and reaps them up to ~0.5 s late: ttl=1, bounded poll
    started = time.monotonic()
    store.put("/lease", "x", ttl=1)
    assert store.create("/lease-c", "c", ttl=1)
    store.put("/kept", "k", ttl=1)
    store.put("/kept", "k")  # a put without ttl makes the key permanent
    assert store.get("/lease") == "x"
    assert wait_for(lambda: store.get("/lease") is None and store.get("/lease-c") is None, 5)
    assert time.monotonic() - started >= 0.9  # never before its ttl
    assert store.range("/") == {"/kept": "k"}
    assert store.create("/lease", "y")


def test_update_is_atomic_under_contention(store, connect):
    def worker():
        s = connect()  # one connection per thread, as separate processes would have
        for _ in range(50):
            s.update("/counter", lambda v: (v or 0) + 1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("/counter") == 200


def test_wait_sees_changes_from_another_connection(store, connect):
    other = connect()

    def later():
        time.sleep(0.2)
        other.put("/w/other", 1)  # wakes the waiter, predicate still false
        time.sleep(0.1)
        other.put("/w/ready", True)

    threading.Thread(target=later).start()
    got = store.wait("/w/", lambda items: "/w/ready" in items, timeout=5)
    assert got == {"/w/other": 1, "/w/ready": True}
    assert store.wait("/w/", lambda items: True, timeout=0) == got  # true at once
    started = time.monotonic()
    assert store.wait("/never/", lambda items: bool(items), timeout=0.2) is None
    assert time.monotonic() - started < 2


def test_follow_tells_only_what_changed(store, connect):
    store.put("/f/a", 1)
    store.put("/f/b", {"x": 1})
    store.put("/g/out", 0)
    other = connect()
    with store.follow("/f/") as follower:
        assert follower.items == {"/f/a": 1, "/f/b": {"x": 1}}
        other.put("/f/c", [1, 2])
        other.put("/g/out", 1)  # not under the prefix
        other.delete("/f/a")
        other.put("/f/b", {"x": 2})
        seen = {}
        while len(seen) < 3:  # together or in several batches, each change told once
            changed = follower.changes(5)
            assert changed, "no change told within 5 s"
            seen.update(changed)
        assert seen == {"/f/c": [1, 2], "/f/a": None, "/f/b": {"x": 2}}
        assert follower.items == {"/f/b": {"x": 2}, "/f/c": [1, 2]}
        assert follower.changes(0.2) == {}  # nothing new: it returns empty-handed at the timeout
        other.put("/f/b", {"x": 3})
        assert follower.changes(5) == {"/f/b": {"x": 3}}


def test_follow_reads_again_when_its_watch_fails(store, connect, monkeypatch):
    """etcd: a watch refused (its revision compacted, a member gone) is replaced by one read of
    the prefix; the caller still gets exactly what changed (SQLite: its polling does that anyway)."""
    store.put("/h/a", 1)
    follower = store.follow("/h/")
    connect().put("/h/b", 2)
    if hasattr(store, "client"):
        from pcocc.store.etcd import EtcdError

        def refused(*args, **kwargs):
            raise EtcdError("etcd cancelled a watch on /h/: compacted")
            yield  # a generator, as the real one

        monkeypatch.setattr(store.client, "watch", refused)
    assert follower.changes(5) == {"/h/b": 2}
    assert follower.items == {"/h/a": 1, "/h/b": 2}
    if hasattr(store, "client"):
        def unconfirmed(*args, **kwargs):  # a loaded etcd that did not even confirm the watch in time
            return
            yield

        monkeypatch.setattr(store.client, "watch", unconfirmed)
    connect().delete("/h/a")
    assert follower.changes(5) == {"/h/a": None}


def test_state_file_is_private(tmp_path):
    import os
    import stat

    SqliteStore(str(tmp_path / "state.db")).close()
    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) & 0o077 == 0


# -- SQLite under concurrency (the etcd server serializes for us)


def test_sqlite_one_store_shared_by_threads(tmp_path):
    """Threads share one store object (one connection): their transactions must not interleave."""
    s = SqliteStore(str(tmp_path / "state.db"))

    def worker():
        for _ in range(25):
            s.update("/counter", lambda v: (v or 0) + 1)
            s.put("/t", 1)
            s.range("/")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.get("/counter") == 200
    s.close()


def test_sqlite_update_is_one_transaction(tmp_path):
    s = SqliteStore(str(tmp_path / "state.db"))
    s.put("/k", 1)

    def refuse(old):
        raise ValueError("no")

    with pytest.raises(ValueError):
        s.update("/k", refuse)
    assert s.get("/k") == 1  # rolled back, and the store still works
    assert s.update("/k", lambda v: v + 1) == 2 and s.get("/k") == 2
    assert s.update("/k", lambda v: None) is None and s.get("/k") is None  # None deletes


def test_sqlite_locked_for_good_is_one_line_naming_the_file(tmp_path):
    """A writer that never lets go: reads go on (WAL), writes end in one line, not a hang."""
    import sqlite3

    path = str(tmp_path / "state.db")
    s = SqliteStore(path, retry_for=0.2, busy_timeout=0.02)
    s.put("/k", "v")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # in WAL mode: the write lock, readers still read
    try:
        assert s.get("/k") == "v"
        with pytest.raises(StoreError) as info:
            s.put("/k", "w")
        message = str(info.value)
        assert path in message and "locked" in message and "\n" not in message
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    s.put("/k", "w")  # usable once the lock is gone
    assert s.get("/k") == "w"


def test_sqlite_busy_is_retried_with_backoff(tmp_path):
    """SQLite returns BUSY at once (no wait) where waiting could deadlock: the store retries."""
    import sqlite3

    s = SqliteStore(str(tmp_path / "state.db"))
    calls = []

    def body():
        calls.append(1)
        if len(calls) < 4:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    assert s._attempts(body) == "done" and len(calls) == 4


def test_sqlite_other_errors_are_one_line_naming_the_file(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as info:
        SqliteStore(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    closed = SqliteStore(str(tmp_path / "ok.db"))
    closed.close()
    with pytest.raises(StoreError, match="used after close"):
        closed.get("/k")


def test_sqlite_store_object_crosses_a_fork(tmp_path):
    """A child of fork() gets its own connection (one must never cross a fork)."""
    import os

    s = SqliteStore(str(tmp_path / "state.db"))
    s.put("/parent", 1)
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, only the store, then _exit
        status = 1
        try:
            s.put("/child", s.get("/parent") + 1)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.get("/child") == 2 and s.revision() >= 2


def test_sqlite_ctrl_c_inside_a_transaction_leaves_none_open(tmp_path, monkeypatch):
    """Ctrl-C between BEGIN and the end of a write (seen: the next write of the same process
    failed with 'cannot start a transaction within a transaction')."""
    from pcocc.store import sqlite as sqlite_mod

    s = SqliteStore(str(tmp_path / "state.db"))
    s.put("/a", 1)
    real_enter = sqlite_mod._Tx.__enter__

    def interrupted(self):
        real_enter(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(sqlite_mod._Tx, "__enter__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.put("/a", 2)
    monkeypatch.setattr(sqlite_mod._Tx, "__enter__", real_enter)
    s.put("/b", 3)  # the next operation of this process works
    assert s.get("/a") == 1 and s.get("/b") == 3
    assert SqliteStore(str(tmp_path / "state.db")).update("/a", lambda v: v + 10) == 11  # and no lock is held
    s.close()


def test_etcd_requests_are_sent_again_while_a_leader_is_elected(monkeypatch):
    """A member died: etcd answers 'leader changed' for a while; the client waits it out
    (seen by the faults bench: `pcocc ps` failed at once)."""
    from pcocc.store import etcd as etcd_mod

    client = etcd_mod.EtcdClient(["http://127.0.0.1:1", "http://127.0.0.1:2"])
    answers = [etcd_mod.EtcdError("etcd at x refused reading /a: leader changed"),
               etcd_mod.EtcdError("etcd at x refused reading /a: etcdserver: no leader"), {"kvs": []}]

    def once(path, body, what):
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(client, "_call_once", once)
    monkeypatch.setattr(etcd_mod.time, "sleep", lambda s: None)
    assert client.call("kv/range", {}) == {"kvs": []}
    assert client._current == 0  # moved on to the next member at each refusal: twice, back to the first
    answers[:] = [etcd_mod.EtcdError("etcd at x refused writing /a: permission denied")]
    with pytest.raises(etcd_mod.EtcdError, match="permission denied"):
        client.call("kv/put", {})


def test_a_member_that_closes_a_request_s_connection_is_left_for_the_next(etcd_server):  # noqa: F811
    """A member SIGKILLed as a request reached it (the faults bench: a launcher failed with
    'etcd at m0 closed the connection' while 2 of 3 members ran): the request goes to the next
    member, each at most once; with none left, the last member's failure is raised."""
    import socket

    from pcocc.store import etcd as etcd_mod

    dying = socket.socket()
    dying.bind(("127.0.0.1", 0))
    dying.listen(16)
    stop = threading.Event()

    def accept_and_close():  # accepts the connection, reads the request, answers nothing
        dying.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = dying.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.close()

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    try:
        bad = f"http://127.0.0.1:{dying.getsockname()[1]}"
        client = etcd_mod.EtcdClient([bad, etcd_server.url])
        client.urls, client._current = [bad, etcd_server.url], 0  # the dying member first
        assert "header" in client.call("kv/range", {"key": "AA==", "range_end": "AA==", "count_only": True})
        assert client.url == etcd_server.url
        alone = etcd_mod.EtcdClient([bad, bad])
        with pytest.raises(etcd_mod.EtcdLost, match="closed the connection"):
            alone.call("kv/range", {"key": "AA=="})
    finally:
        stop.set()
        t.join()
        dying.close()
