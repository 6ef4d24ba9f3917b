"""The embedded store: one SQLite file, safe across processes of one host.

Values are JSON text. A key with a ttl carries an expiry time and is invisible
(and purged) once expired. Every change bumps a global revision, which
`Store.wait` polls cheaply.
"""

import functools
import os
import sqlite3
import time

from pcocc.store import Store, StoreError, decode, encode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0);
"""


def _guarded(method):
    """SQLite's errors (locked, read-only, I/O) as one-line store errors naming the file."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from None

    return wrapper


class SqliteStore(Store):
    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        old_umask = os.umask(0o077)  # the state holds credentials: owner only
        try:
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from None
        finally:
            os.umask(old_umask)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")  # a node-local file system: WAL does not work over NFS
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {path}: {exc}") from None

    def _tx(self):
        return _Tx(self.db)

    def _live(self, key):
        row = self.db.execute("SELECT value, expires FROM kv WHERE key=?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return row[0]

    def _bump(self):
        self.db.execute("UPDATE meta SET value = value + 1 WHERE name='revision'")

    def _purge(self):
        if self.db.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (time.time(),)).rowcount:
            self._bump()

    @_guarded
    def get(self, key):
        return decode(self._live(key))

    @_guarded
    def range(self, prefix):
        now = time.time()
        rows = self.db.execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ? AND (expires IS NULL OR expires > ?) ORDER BY key",
            (prefix, prefix + "\uffff", now),
        )
        return {k: decode(v) for k, v in rows}

    @_guarded
    def put(self, key, value, ttl=None):
        with self._tx():
            self._write(key, value, ttl)

    def _write(self, key, value, ttl):
        expires = time.time() + ttl if ttl else None
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, encode(value), expires))
        self._bump()

    @_guarded
    def delete(self, key):
        with self._tx():
            gone = self.db.execute("DELETE FROM kv WHERE key=?", (key,)).rowcount > 0
            if gone:
                self._bump()
            return gone

    @_guarded
    def delete_prefix(self, prefix):
        with self._tx():
            n = self.db.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")).rowcount
            if n:
                self._bump()
            return n

    @_guarded
    def create(self, key, value, ttl=None):
        with self._tx():
            self._purge()
            if self._live(key) is not None:
                return False
            self._write(key, value, ttl)
            return True

    @_guarded
    def replace(self, key, old, new):
        with self._tx():
            self._purge()
            current = self._live(key)
            if (current is None and old is not None) or (current is not None and decode(current) != old):
                return False
            if new is None:
                self.db.execute("DELETE FROM kv WHERE key=?", (key,))
                self._bump()
            else:
                self._write(key, new, None)
            return True

    @_guarded
    def revision(self):
        return self.db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]

    def close(self):
        self.db.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT: one writer at a time across processes."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"state store busy: {exc}") from None
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
