"""Store contract: the semantics every backend keeps, on SQLite and on a real etcd."""

import threading
import time

import pytest
from store_fixtures import connect, etcd_server, store  # noqa: F401 - fixtures

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


def test_state_file_is_private(tmp_path):
    import os
    import stat

    SqliteStore(str(tmp_path / "state.db")).close()
    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) & 0o077 == 0
