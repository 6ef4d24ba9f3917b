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


class Store:
    """The interface; see sqlite.py for the semantics every backend keeps."""

    def get(self, key):
        """The value of key, or None."""
        raise NotImplementedError

    def range(self, prefix):
        """{key: value} of every key starting with prefix, sorted by key."""
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
