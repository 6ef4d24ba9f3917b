"""Fixtures for tests that run on every store backend: SQLite and a real etcd."""

import pytest
from etcd_fixture import etcd_server  # noqa: F401 - a fixture

from pcocc.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "etcd"])
def connect(request, tmp_path):
    """A function that opens one more connection to one fresh, empty store of the backend."""
    opened = []
    if request.param == "sqlite":

        def opener():
            opened.append(SqliteStore(str(tmp_path / "state.db")))
            return opened[-1]

    else:
        from pcocc.store.etcd import EtcdStore

        url = request.getfixturevalue("etcd_server").url

        def opener():
            opened.append(EtcdStore([url]))
            return opened[-1]

        opener().delete_prefix("")  # the server is shared by the session's tests
    yield opener
    for s in opened:
        s.close()


@pytest.fixture
def store(connect):
    return connect()
