"""The embedded store: one SQLite file, safe for any number of processes and threads of one host.

Values are JSON text. A key with a ttl carries an expiry time and is invisible
(and purged) once expired. Every change bumps a global revision, which
`Store.wait` polls cheaply.

Concurrency (the rules are SQLite's: https://www.sqlite.org/lockingv3.html,
https://www.sqlite.org/wal.html, https://www.sqlite.org/c3ref/busy_handler.html):
- The file is created by whoever comes first (O_CREAT, mode 0600; SQLite gives
  its -wal and -shm files the same mode). An empty file is an empty database.
- It is switched to WAL once (persistent in the file): readers never wait for
  the writer. The switch needs an exclusive lock, and a fresh file is in
  rollback-journal mode until then, where SQLite returns SQLITE_BUSY at once,
  without waiting, when waiting could deadlock (a reader that wants to write
  while a writer waits for the readers to leave). So:
- Every operation runs under `_attempts`: SQLite's busy handler waits up to
  BUSY_TIMEOUT for a lock; a BUSY or LOCKED that still comes back (at once, or
  after that wait) rolls the transaction back, which drops the locks that
  could deadlock, and the whole operation is retried after a randomized,
  exponentially growing pause, until RETRY_FOR seconds have passed; then a
  one-line StoreError names the file.
- Every read-modify-write is one BEGIN IMMEDIATE transaction (the write lock
  is taken before the read), so it cannot be overtaken, and `update` needs no
  compare-and-swap loop.
- One connection per store object per process: calls from several threads
  are serialized by a lock (a transaction is per connection), and a child
  process after fork() opens its own (a connection must not cross a fork).
"""

import functools
import os
import random
import sqlite3
import threading
import time
import weakref

from pcocc.store import Store, StoreError, check_transaction, decode, encode

BUSY_TIMEOUT = 5.0  # seconds SQLite's busy handler waits for a lock, per attempt
RETRY_FOR = 120.0  # seconds of attempts before giving up (a writer holds the lock for milliseconds)
BACKOFF_FIRST, BACKOFF_MAX = 0.002, 0.25  # seconds: the pause before the 2nd attempt, and its cap

_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta VALUES ('revision', 0)",
)

# Connections inherited through fork(): never used nor closed in the child (closing
# could disturb the parent's locks); kept here so that no finalizer closes them.
_INHERITED = []
# Every store of this process: a child of fork() gets new locks (another thread of the
# parent may have held one at the fork).
_STORES = weakref.WeakSet()


def _after_fork_in_child():
    for store in list(_STORES):
        store._lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_busy(exc):
    """Whether exc is SQLite's "database is locked"/"busy" (another connection holds a lock)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc)
    return "locked" in text or "busy" in text


def _operation(method):
    """Run a store method under the store's lock, on this process's connection, with retries."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if self._closed:
                raise StoreError(f"state store {self.path}: used after close")
            return self._attempts(lambda: method(self, *args, **kwargs))

    return wrapper


class SqliteStore(Store):
    """The Store interface on one SQLite file (path: str); see the module docstring.

    retry_for and busy_timeout (seconds) bound the waits for a lock; raises
    StoreError (one line, naming the file) when the file cannot be created,
    opened or used.
    """

    def __init__(self, path, *, retry_for=RETRY_FOR, busy_timeout=BUSY_TIMEOUT):
        self.path = path
        self.retry_for = retry_for
        self.busy_timeout = min(busy_timeout, retry_for)
        self._lock = threading.RLock()
        self._db = None
        self._pid = None
        self._ready = False
        self._closed = False
        _STORES.add(self)
        with self._lock:
            self._attempts(self._open)

    # -- connection
    def _create_file(self):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
            # the state holds credentials: owner only. Not through the umask, which is per process
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create the state store {self.path}: {exc.strerror}") from None
        os.close(fd)

    def _open(self):
        """Connect, switch the file to WAL and create the tables; idempotent (retried when busy)."""
        if self._db is None or self._pid != os.getpid():
            if self._db is not None:
                _INHERITED.append(self._db)  # another process's: leave it alone
                self._db = None
            self._create_file()
            try:
                db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the state store {self.path}: {exc}") from None
            self._db, self._pid = db, os.getpid()
            self._ready = False
        if self._ready:
            return
        db = self._db
        # WAL is a property of the file: the first opener switches it (a node-local file
        # system: WAL's shared memory does not work over NFS)
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":  # not switched and no error: not possible on this file system
                raise StoreError(f"state store {self.path}: cannot use write-ahead logging (journal mode stays {mode}); "
                                 "put the store on a local file system (settings.store-path)")
        db.execute("PRAGMA synchronous=NORMAL")  # per connection: durable at checkpoints, never corrupt
        try:
            has_schema = db.execute("SELECT 1 FROM meta WHERE name='revision'").fetchone() is not None
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            has_schema = False
        if not has_schema:
            with _Tx(db):
                for statement in _SCHEMA:
                    db.execute(statement)
        self._ready = True

    @property
    def db(self):
        """This process's connection (reopened after a fork)."""
        if self._pid != os.getpid() or self._db is None or not self._ready:
            self._open()
        return self._db

    def _attempts(self, body):
        """body() until it does not meet a busy database, with randomized exponential backoff.

        Raises StoreError naming the file after retry_for seconds of busy attempts, or at
        once for any other SQLite error (read-only, disk full, I/O error, corrupt file).
        """
        deadline = time.monotonic() + self.retry_for
        pause = BACKOFF_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                return body()
            except sqlite3.Error as exc:
                self._rollback()
                if not _is_busy(exc):
                    raise StoreError(f"state store {self.path}: {exc}") from None
                if time.monotonic() >= deadline and attempt >= 3:
                    raise StoreError(
                        f"state store {self.path}: still locked by another process after {attempt} attempts "
                        f"in {self.retry_for:g} s ({exc})"
                    ) from None
            except BaseException:
                # Ctrl-C (or any error) may land between BEGIN and the context manager's exit:
                # never leave the connection inside a transaction for the next operation.
                self._rollback()
                raise
            # full jitter: waiters that collided do not collide again in step
            time.sleep(random.uniform(0, pause))
            pause = min(BACKOFF_MAX, pause * 2)

    def _rollback(self):
        db = self._db
        if db is not None and self._pid == os.getpid():
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back itself

    # -- helpers, inside an operation
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

    def _write(self, key, value, ttl):
        expires = time.time() + ttl if ttl else None
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, encode(value), expires))
        self._bump()

    def _tx(self):
        return _Tx(self.db)

    # -- the interface
    @_operation
    def get(self, key, stale_ok=False):
        return decode(self._live(key))

    @_operation
    def range(self, prefix, stale_ok=False):
        now = time.time()
        rows = self.db.execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ? AND (expires IS NULL OR expires > ?) ORDER BY key",
            (prefix, prefix + "\uffff", now),
        ).fetchall()
        return {k: decode(v) for k, v in rows}

    @_operation
    def put(self, key, value, ttl=None):
        with self._tx():
            self._write(key, value, ttl)

    @_operation
    def delete(self, key):
        with self._tx():
            gone = self.db.execute("DELETE FROM kv WHERE key=?", (key,)).rowcount > 0
            if gone:
                self._bump()
            return gone

    @_operation
    def delete_prefix(self, prefix):
        with self._tx():
            n = self.db.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")).rowcount
            if n:
                self._bump()
            return n

    @_operation
    def create(self, key, value, ttl=None):
        with self._tx():
            self._purge()
            if self._live(key) is not None:
                return False
            self._write(key, value, ttl)
            return True

    @_operation
    def replace(self, key, old, new):
        with self._tx():
            self._purge()
            return self._swap(key, old, new)

    def _swap(self, key, old, new):
        current = self._live(key)
        if (current is None and old is not None) or (current is not None and decode(current) != old):
            return False
        if new is None:
            self.db.execute("DELETE FROM kv WHERE key=?", (key,))
            self._bump()
        else:
            self._write(key, new, None)
        return True

    @_operation
    def update(self, key, fn, retries=None):
        """new = fn(old) for key, in one write transaction: never overtaken, so never retried
        for a conflict (only for a busy database: fn may run more than once). new None deletes.
        Exceptions of fn propagate and change nothing."""
        with self._tx():
            self._purge()
            old = decode(self._live(key))
            new = fn(old)
            self._swap(key, old, new)
            return new

    @_operation
    def transact(self, expect, writes, reads=()):
        """Store.transact in one BEGIN IMMEDIATE transaction (never overtaken: a failure means
        that an expectation was false when the write lock was held)."""
        check_transaction(expect, writes, reads)
        with self._tx():
            self._purge()
            raw = {key: self._live(key) for key in {*expect, *reads}}
            current = {key: decode(text) for key, text in raw.items()}
            if any((raw[key] is not None) if value is None else (raw[key] is None or current[key] != value)
                   for key, value in expect.items()):
                return False, current
            for key, value in writes.items():
                if value is None:
                    if self.db.execute("DELETE FROM kv WHERE key=?", (key,)).rowcount:
                        self._bump()
                else:
                    self._write(key, value, None)
            return True, {key: current[key] for key in reads}

    @_operation
    def revision(self):
        return self.db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]

    def close(self):
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None
            self._ready = False
            self._pid = None
            self._closed = True


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT: the write lock before the first read, one writer at a time
    across processes. SQLite's errors propagate (SqliteStore._attempts retries busy ones)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")  # a busy COMMIT leaves the transaction open: _attempts rolls it back
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")
