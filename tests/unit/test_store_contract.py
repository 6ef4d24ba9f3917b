"""Store contract: the semantics every backend keeps (SQLite here; etcd joins later)."""

import threading
import time

import pytest

from pcocc.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite"])
def store(request, tmp_path):
    s = SqliteStore(str(tmp_path / "state.db"))
    yield s
    s.close()


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


def test_create_and_replace_are_compare_and_swap(store):
    assert store.create("/k", 1)
    assert not store.create("/k", 2)
    assert store.get("/k") == 1
    assert not store.replace("/k", 5, 6)
    assert store.replace("/k", 1, 2) and store.get("/k") == 2
    assert store.replace("/k", 2, None) and store.get("/k") is None
    assert store.replace("/k", None, 7) and store.get("/k") == 7


def test_ttl_expires(store):
    store.put("/lease", "x", ttl=0.2)
    assert store.get("/lease") == "x"
    time.sleep(0.3)
    assert store.get("/lease") is None and store.range("/") == {}
    assert store.create("/lease", "y")


def test_update_is_atomic_under_contention(store, tmp_path):
    def worker():
        s = SqliteStore(str(tmp_path / "state.db"))
        for _ in range(50):
            s.update("/counter", lambda v: (v or 0) + 1)
        s.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("/counter") == 200


def test_wait_sees_changes_from_another_connection(store, tmp_path):
    def later():
        time.sleep(0.2)
        s = SqliteStore(str(tmp_path / "state.db"))
        s.put("/w/ready", True)
        s.close()

    threading.Thread(target=later).start()
    got = store.wait("/w/", lambda items: "/w/ready" in items, timeout=5)
    assert got == {"/w/ready": True}
    assert store.wait("/never/", lambda items: bool(items), timeout=0.2) is None


def test_state_file_is_private(store, tmp_path):
    import os
    import stat

    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) & 0o077 == 0
