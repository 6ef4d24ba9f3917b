"""The key-value store that holds cluster state, behind one interface.

Backends: SQLite (embedded, single host) and, later, etcd v3. Keys are
strings like "/pcocc/users/alice/clusters/12/vms/0"; values are JSON-able.
"""

import json
import random
import time

from pcocc.errors import PcoccError


class StoreError(PcoccError):
    pass


# The most keys one `transact` may compare, and the most it may write (reads count as
# operations too): etcd's --max-txn-ops, whose default is 128 (etcd.io/docs/v3.4/op-guide/
# configuration: "Maximum number of operations permitted in a transaction"). Both backends
# keep it, so that what passes on SQLite passes on etcd.
MAX_TXN_OPS = 128


class Store:
    """The interface; see sqlite.py for the semantics every backend keeps."""

    def get(self, key, stale_ok=False):
        """The value of key, or None. stale_ok: the caller checks what it read in a later
        transaction, so the answer may lag the latest write a little (etcd: a serializable
        read from the member asked, without the leader's ReadIndex round; SQLite: no
        difference)."""
        raise NotImplementedError

    def range(self, prefix, stale_ok=False):
        """{key: value} of every key starting with prefix, sorted by key (stale_ok: as get)."""
        raise NotImplementedError

    def put(self, key, value, ttl=None):
        """Set key; with ttl (seconds), the key disappears unless put again before then."""
        raise NotImplementedError

    def delete(self, key):
        """Delete key; return whether it existed."""
        raise NotImplementedError

    def delete_prefix(self, prefix):
        """Delete every key under prefix; return how many."""
        raise NotImplementedError

    def create(self, key, value, ttl=None):
        """Set key only if absent; return whether it was set."""
        raise NotImplementedError

    def replace(self, key, old, new):
        """Compare and swap: set key to new only if its value is old (None: absent)."""
        raise NotImplementedError

    def transact(self, expect, writes, reads=()):
        """Compare several keys and write several keys, all at once or not at all.

        expect: {key: value}, each key's current value compared as JSON, None meaning
        absent (a key that holds JSON null is present); writes: {key: value}, None
        deleting the key (no ttl: what a transaction writes stays until deleted);
        reads: keys whose values come back whatever happens.
        Returns (done, current): done when every expectation held and the writes were
        made; current is {key: value or None} of the reads, and on failure also of every
        expected key, as they were when compared (one consistent read: the caller learns
        in the same round trip why it failed).
        Raises StoreError when len(expect), len(writes) + len(reads) or the expected and
        read keys together exceed MAX_TXN_OPS (etcd's limit), or a key is both written and read.
        """
        raise NotImplementedError

    def revision(self):
        """A number that grows with every change (for watching)."""
        raise NotImplementedError

    def close(self):
        pass

    # -- built on the primitives
    def update(self, key, fn, retries=100):
        """Read-modify-write with compare-and-swap: new = fn(old) (None deletes); returns new.

        fn runs again on each conflict, so it must have no other effect. A conflict means
        that another writer's update succeeded: with W writers doing one update each, none
        fails more than W - 1 times. Between attempts, a randomized pause that doubles up
        to 50 ms (full jitter) spreads the writers of a hot key (DESIGN.md: contention with
        randomized backoff). Raises StoreError after `retries` conflicts; fn's exceptions
        propagate.
        """
        pause = 0.001
        for _ in range(retries):
            old = self.get(key)
            new = fn(old)
            if self.replace(key, old, new):
                return new
            time.sleep(random.uniform(0, pause))
            pause = min(0.05, pause * 2)
        raise StoreError(f"too much contention on {key}: {retries} compare-and-swap attempts failed")

    def follow(self, prefix):
        """A Follower of every key under prefix: its `items` ({key: value}) read once now, then
        kept up to date by `changes(timeout)`, which returns only what changed. Here (SQLite):
        the prefix is read again when the store's revision moved; etcd follows a watch and
        reads only the changes. Raises what range raises (PermissionDenied...)."""
        return PollingFollower(self, prefix)

    def wait(self, prefix, predicate, timeout, poll=0.05):
        """Wait until predicate(range(prefix)) is true; return the range, or None on timeout."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            rev = self.revision()
            if rev != last:
                items = self.range(prefix)
                if predicate(items):
                    return items
                last = rev
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)


class Follower:
    """The keys under a prefix, followed (Store.follow). `items`: {key: value} as of the last
    `changes`; `revision`: the store's revision they were read at (or a later one)."""

    def __init__(self, store, prefix):
        self.store, self.prefix = store, prefix
        self.items, self.revision = {}, 0

    def changes(self, timeout):
        """Wait up to timeout s for a change under the prefix; {key: new value, None when
        deleted} of what changed since the last call (several changes together when they came
        together; {} when none came in time), already applied to `items`. Raises StoreError
        when the store cannot be reached."""
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _apply(self, changed):
        for key, value in changed.items():
            if value is None:
                self.items.pop(key, None)
            else:
                self.items[key] = value
        return changed


def diff(old, new):
    """{key: value, None when gone} of what differs from old ({key: value}) to new."""
    out = {k: v for k, v in new.items() if k not in old or old[k] != v}
    out.update({k: None for k in old if k not in new})
    return out


class PollingFollower(Follower):
    """A Follower for any store: reads the prefix again each time the store's revision moves
    (looked at every `poll` s), and tells what differs."""

    def __init__(self, store, prefix, poll=0.05):
        super().__init__(store, prefix)
        self.poll = poll
        self.revision = store.revision()  # before the read: a change in between is seen twice, never missed
        self.items = store.range(prefix)

    def changes(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            rev = self.store.revision()
            if rev != self.revision:
                items = self.store.range(self.prefix)
                self.revision = rev
                changed = diff(self.items, items)
                if changed:
                    self.items = items
                    return changed
            if time.monotonic() >= deadline:
                return {}
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))


def check_transaction(expect, writes, reads):
    """StoreError unless a transaction fits etcd's limits (MAX_TXN_OPS; no key both
    written and read: etcd refuses a txn that names a key twice in its operations)."""
    if len(expect) > MAX_TXN_OPS or len(writes) + len(reads) > MAX_TXN_OPS or len(set(expect) | set(reads)) > MAX_TXN_OPS:
        raise StoreError(f"a store transaction of {len(expect)} compares, {len(writes)} writes and {len(reads)} reads "
                         f"exceeds the limit of {MAX_TXN_OPS} (etcd's --max-txn-ops)")
    if set(writes) & set(reads) or len(set(reads)) != len(reads):
        raise StoreError("a store transaction names a key twice in its writes and reads")


def encode(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def decode(text):
    return None if text is None else json.loads(text)


def open_store(config, env=None):
    """The store the configuration names; env (the caller's user and home) picks etcd credentials."""
    kind = config.batch.store
    if kind == "sqlite":
        from pcocc.store.sqlite import SqliteStore

        return SqliteStore(config.batch.settings["store-path"])
    if kind == "etcd":
        from pcocc.store.etcd import open_etcd
        from pcocc.store.etcdauth import credentials

        if env is None:
            from pcocc.env import Environment

            env = Environment()
        return open_etcd(config.batch.settings, env, credentials=credentials)
    raise StoreError(f"unknown store '{kind}' (known: etcd, sqlite)")
