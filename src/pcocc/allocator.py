"""Cluster-wide allocation of unique ids (VXLAN ids, PKeys, host ports, external IPs) in the store.

A pool is a range of integers [first, last] and a name. Each taken id is a key
of its own, so that allocations of different owners touch different keys and
no key grows with the pool (DESIGN.md, "the store scales per key"):

    /pcocc/global/pools/<name>/<id>                 {"owner": owner}: the id is taken
    /pcocc/global/pool-owners/<name>/<owner>        {"owner": owner, "ids": [id, ...]}: what the owner holds
    /pcocc/global/pool-sweeps/<name>                {"at": unix time}: the last sweep of dead owners
    /pcocc/global/pools/<name>                      the former layout, one table {id: owner}: migrated

An owner is a string naming its job first ("JOBID:..."; `alive(owner)` asks the
batch system about that job). Invariant: an id key names owner O exactly when
the id is in O's owner key; both change in the same transaction (Store.transact),
so an owner's ids are found without scanning and released all at once.

Allocation: one transaction expects the old table absent, the owner's key as last
seen (a fresh owner: absent) and each candidate id absent, and writes the
candidates and the owner key. On failure the store says in the same round trip
which expectation failed, so the next attempt knows the owner's ids (another node
of the same job won: nothing more to take) and which candidates are taken.
Candidates are drawn at random over the range, several ids as an aligned block (a
free id costs no read: one round trip for a fresh owner); pools of at most SCAN_SIZE ids, or pools that probing finds
mostly full, read their taken ids (one range read, O(taken), never the whole range
key by key) and take the lowest free ones first, random free ones after a conflict.
Failed attempts pause for a randomized, doubling time (full jitter) and are bounded
(MAX_ATTEMPTS).

Ids are never freed by time (no lease): an etcd outage longer than any TTL must
not give a running job's VXLAN id or PKey to another job. They are freed by
`release` (the node's undo log), or, for jobs that ended without it, when the
batch system says the owner's job is dead (`alive`, as given by node setup):
- a scanned pool (small, or found nearly full) sees every owner in its scan and
  releases the dead ones at once, as the former single-key pools did;
- a probe that meets a dead owner's id releases that owner;
- a probed pool is swept of dead owners by the first allocation given `alive`
  once the last sweep is older than SWEEP_PERIOD (one range read of its owner
  keys, O(owners)); the sweep marker is read in the allocation's own transaction.
So while a pool is in use, a dead job's ids are back within SWEEP_PERIOD (30 s)
plus the time to the next allocation; `sweep(store, alive)` does every pool on
demand (for a periodic cleanup: then within a minute whatever the traffic).

Migration: a pool whose old table key exists is migrated by whoever meets it
first (every transaction here expects it absent, so none can act on a pool
half-migrated): chunks of entries move from the table to their keys, each chunk
one transaction that also rewrites the table without them, so concurrent
migrators never move an entry twice. Undo logs name pools and owners, never
keys, so a log written before the migration releases the same ids after it.
All nodes must run this layout once one has migrated (the former code does not
see per-id keys).
"""

import logging
import random
import time
from urllib.parse import quote

from pcocc import state
from pcocc.errors import ResourceError
from pcocc.store import MAX_TXN_OPS, StoreError

log = logging.getLogger("pcocc.allocator")

POOLS = "/pcocc/global/pools/"
OWNERS = "/pcocc/global/pool-owners/"
SWEEPS = "/pcocc/global/pool-sweeps/"

# Pools of at most this many ids are scanned (one range read of the taken ones) rather than
# probed: a node's reverse-NAT ports (100 by default) or a /24 of external addresses cost one
# read of at most this many small keys, and keep the former "lowest free id first" order.
SCAN_SIZE = 1024
# Probing turns to a scan when more than this share of the probed ids was taken (a pool
# nearly full: random draws would mostly miss), or after PROBE_ROUNDS failed rounds. A
# failed round keeps the candidates that were free and draws again only for the taken ones,
# so at a share p taken, k ids need about log(k)/log(1/p) + 1 rounds (p = 0.25, k = 16:
# 3 on average), not 1/(1-p)^k.
FULL_SHARE = 0.5
PROBE_ROUNDS = 16
# New ids per transaction: etcd allows MAX_TXN_OPS (128) compares and 128 operations; an
# allocation compares the old table, the owner key and each candidate, and writes each
# candidate, the owner key and reads the sweep marker.
BATCH = MAX_TXN_OPS - 8
# Failed transactions before giving up ("too much contention"). Each failure tells which
# ids were taken, so even 200 allocators racing for one small pool need a handful each
# (tests/unit/test_alloc_scale.py); the bound turns a livelock into an error.
MAX_ATTEMPTS = 200
BACKOFF_FIRST, BACKOFF_MAX = 0.001, 0.1  # seconds: first pause after a conflict, and its cap (full jitter)
# Seconds between two sweeps of a pool's dead owners (reclaim within a minute: a sweep
# every 30 s while the pool is used, plus the immediate reclaims above).
SWEEP_PERIOD = 30.0


def id_key(name, i):
    """The key of id i (int) of pool name: present while the id is taken."""
    return f"{POOLS}{name}/{int(i)}"


def owner_key(name, owner):
    """The key listing the ids owner holds in pool name (the owner URL-quoted: no "/")."""
    return f"{OWNERS}{name}/{quote(str(owner), safe=':@-_.,')}"


def sweep_key(name):
    """The key holding when pool name was last swept of dead owners."""
    return f"{SWEEPS}{name}"


def _mark(owner):
    return {"owner": owner}


class Pool:
    """The ids first..last (ints, inclusive) of pool `name` in `store` (a pcocc.store.Store).

    first and last matter only to allocate: release, owners and sweep work with any
    (callers release with Pool(store, name, 0, 0)).
    """

    def __init__(self, store, name, first, last):
        self.store = store
        self.name = name
        self.first, self.last = first, last
        self.key = state.pool_key(name)  # the former single-key table, migrated on first use
        self.prefix = f"{POOLS}{name}/"
        self.owners_prefix = f"{OWNERS}{name}/"

    @property
    def size(self):
        """How many ids the pool has (0 for the Pool(store, name, 0, 0) of a release)."""
        return max(0, self.last - self.first + 1)

    # ------------------------------------------------------------------ allocate
    def allocate(self, owner, count=1, alive=None):
        """count ids for owner, sorted (ints); the ids it holds already count, so a second
        call (another node of the same job) returns the same ids.

        alive: f(owner) -> whether the owner's job still runs; owners it says dead lose
        their ids when this pool needs them, and at the periodic sweep. It must answer
        False only for jobs that have ended (a stale list of running jobs would reclaim a
        new job's ids).
        Raises ResourceError when the pool has fewer than count free ids (after reclaiming
        the dead), StoreError after MAX_ATTEMPTS conflicting attempts or when the store fails.
        """
        owner = str(owner)
        okey = self.owners_key(owner)
        held = None  # the owner key as last seen; at first we guess absent (a fresh owner)
        seen = False  # whether `held` was read, not guessed
        taken = {}  # id -> owner, of ids found taken by others during this call
        probed = hits = 0
        small = scan = self.size <= SCAN_SIZE
        conflicts, pause = 0, BACKOFF_FIRST
        swept_at = None
        checked = alive is None  # whether the owners met in a scan were checked against `alive`
        keep = []  # candidates of the last failed round that were free then
        learned = {}  # id -> owner, of candidates found taken by our failed transactions
        while True:
            mine = list(held["ids"]) if held else []
            need = count - len(mine)
            if need <= 0 and seen:
                break
            candidates, block = [], False
            if need > 0:
                if scan:
                    # a scan may lag a little (a hint): what this call saw taken counts too
                    taken = {**self._scan(), **learned}
                    if not checked:  # a scan sees every owner: the dead ones are reclaimed as we go
                        checked = True
                        if self._reclaim_dead(taken, owner, alive):
                            continue
                candidates, block = self._pick(min(need, BATCH), mine, taken, scan, random_order=conflicts > 0, keep=keep)
                if candidates is None:  # not enough free ids
                    if scan:
                        raise ResourceError(f"no free {self.name} left ({self.first}-{self.last}: {len(taken)} in use)")
                    scan = True
                    continue
            expect = {self.key: None, okey: held, **{id_key(self.name, i): None for i in candidates}}
            writes = {}
            if candidates:
                writes = {**{id_key(self.name, i): _mark(owner) for i in candidates},
                          okey: {"owner": owner, "ids": sorted(mine + candidates)}}
            reads = [sweep_key(self.name)] if alive is not None and not small else []
            done, current = self.store.transact(expect, writes, reads)
            if alive is not None:
                swept_at = current.get(sweep_key(self.name))
            if done:
                if candidates:
                    held = writes[okey]
                seen = True
                continue
            if current.get(self.key) is not None:
                self._migrate()
                continue
            owner_moved = current.get(okey) != held or not seen
            held, seen = current.get(okey), True
            lost = {i: (current.get(id_key(self.name, i)) or {}).get("owner") for i in candidates
                    if current.get(id_key(self.name, i)) is not None}
            taken.update(lost)
            learned.update(lost)
            keep = [i for i in candidates if i not in lost]
            others = {i: o for i, o in lost.items() if o != owner}
            # the share of draws that met a taken id: a block is one draw (met whole or not at all)
            probed += 1 if block else len(candidates)
            hits += (1 if others else 0) if block else len(others)
            if others and alive is not None:
                dead = {o for o in others.values() if o and not alive(o)}
                if dead:
                    for o in sorted(dead):
                        log.info("pool %s: reclaiming the ids of %s (its job has ended)", self.name, o)
                        self.release(o)
                    taken = {i: o for i, o in taken.items() if o not in dead}
                    learned = {i: o for i, o in learned.items() if o not in dead}
                    continue
            if not scan and (conflicts + 1 >= PROBE_ROUNDS or (probed >= 8 and hits > FULL_SHARE * probed)):
                scan = True
            if not others and owner_moved:
                continue  # we learned the owner's ids (another node of the job was first): no pause
            conflicts += 1
            if conflicts >= MAX_ATTEMPTS:
                raise StoreError(f"too much contention on pool {self.name}: {conflicts} transactions failed")
            time.sleep(random.uniform(0, pause))
            pause = min(BACKOFF_MAX, pause * 2)
        if alive is not None and not small:
            self._maybe_sweep(alive, owner, swept_at)
        return sorted(held["ids"])[:count]

    def owners_key(self, owner):
        """owner_key of this pool."""
        return owner_key(self.name, owner)

    def _scan(self, stale_ok=True):
        """{id: owner} of every taken id (one range read: O(taken ids), never the whole range).
        A hint by default (the transaction that follows checks every id it takes)."""
        found = {}
        for key, value in self.store.range(self.prefix, stale_ok=stale_ok).items():
            try:
                i = int(key[len(self.prefix):])
            except ValueError:
                continue
            found[i] = value.get("owner") if isinstance(value, dict) else None
        return found

    def _pick(self, n, mine, taken, scan, random_order, keep=()):
        """(n free ids (not mine, not known taken), whether they are one block drawn at random),
        or (None, False) when the pool cannot have n; probing starts from `keep` (ids found
        free by the last attempt)."""
        excluded = set(mine) | set(taken)
        if scan:
            free = [i for i in range(self.first, self.last + 1) if i not in excluded]
            if len(free) < n:
                return None, False
            return (sorted(random.sample(free, n)) if random_order else free[:n]), False
        if self.size - len(excluded) < n:
            return None, False
        picked = {i for i in keep if i not in excluded}
        picked = set(sorted(picked)[:n])
        if len(picked) == n:
            return sorted(picked), False
        if not picked and n > 1:
            # a first draw of several ids: an aligned block at random. Owners that take the
            # same count tile the pool, so a draw meets another owner's block as a whole or
            # not at all: at a share p taken, it succeeds with probability about 1 - p rather
            # than (1 - p)**n for n scattered ids (a node's 16 addresses: 0.76 against 0.01
            # with a /16 a quarter full). A node's VMs also get neighbouring addresses.
            align = 1 << (n - 1).bit_length()
            blocks = self.size // align
            if blocks >= 2:
                start = self.first + align * random.randrange(blocks)
                block = [i for i in range(start, start + n) if i not in excluded]
                if len(block) == n:
                    return block, True
                picked.update(block)
        for _ in range(20 * n + 20):  # rejection sampling: the known-taken are few (else we scan)
            i = random.randint(self.first, self.last)
            if i not in excluded and i not in picked:
                picked.add(i)
                if len(picked) == n:
                    return sorted(picked), False
        return None, False  # mostly taken: the caller turns to a scan

    def _reclaim_dead(self, taken, owner, alive):
        """Release every owner of `taken` whose job is dead; whether any was."""
        dead = {o for o in set(taken.values()) if o and o != owner and not alive(o)}
        for o in sorted(dead):
            log.info("pool %s: reclaiming the ids of %s (its job has ended)", self.name, o)
            self.release(o)
        return bool(dead)

    # ------------------------------------------------------------------ release
    def release(self, owner):
        """Free every id owner holds (none: nothing to do); idempotent. Raises StoreError."""
        owner = str(owner)
        okey = self.owners_key(owner)
        held = self.store.get(okey, stale_ok=True)  # checked by the transaction
        for _attempt in range(MAX_ATTEMPTS):
            ids = sorted((held or {}).get("ids", []))
            chunk, rest = ids[:BATCH], ids[BATCH:]
            expect = {self.key: None, okey: held, **{id_key(self.name, i): _mark(owner) for i in chunk}}
            writes = {id_key(self.name, i): None for i in chunk}
            if held is not None:
                writes[okey] = {"owner": owner, "ids": rest} if rest else None
            done, current = self.store.transact(expect, writes)
            if done:
                if not rest:
                    return
                held = writes[okey]
                continue
            if current.get(self.key) is not None:
                self._migrate()
                held = self.store.get(okey)
                continue
            if current.get(okey) != held:
                held = current.get(okey)
                continue
            # an id listed for owner names another owner (never written so by this module):
            # leave that id alone, drop it from the owner's list
            strays = {i for i in chunk if current.get(id_key(self.name, i)) != _mark(owner)}
            log.warning("pool %s: ids %s listed for %s belong to others; left to them", self.name, sorted(strays), owner)
            kept = [i for i in ids if i not in strays]
            if not self.store.transact({okey: held}, {okey: {"owner": owner, "ids": kept} if kept else None})[0]:
                held = self.store.get(okey)
                continue
            held = {"owner": owner, "ids": kept} if kept else None
        raise StoreError(f"too much contention on pool {self.name}: releasing {owner} failed {MAX_ATTEMPTS} times")

    # ------------------------------------------------------------------ read
    def owners(self):
        """{id (int): owner} of every taken id (migrating the old table first)."""
        if self.store.get(self.key) is not None:
            self._migrate()
        return dict(sorted(self._scan(stale_ok=False).items()))

    def held(self, owner):
        """The ids owner holds, sorted."""
        if self.store.get(self.key) is not None:
            self._migrate()
        return sorted((self.store.get(self.owners_key(owner)) or {}).get("ids", []))

    # ------------------------------------------------------------------ dead owners
    def sweep(self, alive):
        """Release the ids of every owner whose job is dead (alive(owner) False); returns
        those owners. One range read of the pool's owner keys (O(owners)), then one release
        per dead owner."""
        owners = sorted({(v or {}).get("owner") for v in self.store.range(self.owners_prefix, stale_ok=True).values()} - {None})
        dead = [o for o in owners if not alive(o)]
        for o in dead:
            log.info("pool %s: reclaiming the ids of %s (its job has ended)", self.name, o)
            self.release(o)
        return dead

    def _maybe_sweep(self, alive, owner, last):
        """Sweep when the last sweep is older than SWEEP_PERIOD; one allocator wins the
        marker (compare-and-swap) and sweeps, the others go on."""
        now = time.time()
        if last is not None and now - float((last or {}).get("at", 0)) < SWEEP_PERIOD:
            return
        if not self.store.replace(sweep_key(self.name), last, {"at": now}):
            return  # another allocator sweeps
        self.sweep(lambda o: o == owner or alive(o))

    # ------------------------------------------------------------------ migration
    def _migrate(self):
        """Move the old table's entries to their keys, a chunk per transaction; safe when
        several processes migrate at once (each chunk rewrites the table it compared)."""
        table = self.store.get(self.key)
        cache = {}  # owner -> its owner key's value as last seen
        moved = 0
        while table is not None:
            if not isinstance(table, dict):
                log.warning("pool %s: the former table %s is not a table; dropped", self.name, self.key)
                if self.store.replace(self.key, table, None):
                    return
                table = self.store.get(self.key)
                continue
            entries = sorted((int(i), str(o)) for i, o in table.items() if o is not None and str(i).isdigit())[: BATCH // 2]
            moving = {i for i, _ in entries}
            owners = sorted({o for _, o in entries})
            for o in owners:
                if o not in cache:
                    cache[o] = self.store.get(self.owners_key(o))
            new = {}
            for i, o in entries:
                new.setdefault(o, sorted((cache[o] or {}).get("ids", [])))
                if i not in new[o]:
                    new[o].append(i)
            rest = {k: v for k, v in table.items() if v is not None and str(k).isdigit() and int(k) not in moving}
            expect = {self.key: table, **{self.owners_key(o): cache[o] for o in owners},
                      **{id_key(self.name, i): None for i, _ in entries}}
            writes = {self.key: rest or None, **{id_key(self.name, i): _mark(o) for i, o in entries},
                      **{self.owners_key(o): {"owner": o, "ids": sorted(new[o])} for o in owners}}
            done, current = self.store.transact(expect, writes)
            if done:
                moved += len(entries)
                cache.update({o: writes[self.owners_key(o)] for o in owners})
                table = rest or None
                continue
            table = current.get(self.key)
            cache.update({o: current.get(self.owners_key(o)) for o in owners})
            clash = {i: current[id_key(self.name, i)] for i, _ in entries if current.get(id_key(self.name, i)) is not None}
            if clash and table is not None:
                # an id already has its own key: the per-id layout wins (a migrator that died after
                # its chunk cannot cause this: the chunk and the table's rewrite are one transaction)
                log.warning("pool %s: ids %s of the former table already taken in the new layout", self.name, sorted(clash))
                table = {k: v for k, v in table.items() if int(k) not in clash}
                if not self.store.replace(self.key, current.get(self.key), table or None):
                    table = self.store.get(self.key)
        if moved:
            log.info("pool %s: %d ids moved from the former table %s to one key each", self.name, moved, self.key)


def sweep(store, alive):
    """Release the ids of every dead owner (alive(owner) False) in every pool; returns
    {pool name: [owners released]}. One range read of every owner key (O(owners of all
    pools), never the ids), then one release per dead owner. For a periodic cleanup
    (e.g. `pcocc internal setup cleanup`, or a cron job of the SLURM controller's host)."""
    out = {}
    for key, value in store.range(OWNERS).items():
        name = key[len(OWNERS):].split("/", 1)[0]
        owner = (value or {}).get("owner") if isinstance(value, dict) else None
        if owner is not None and not alive(owner):
            Pool(store, name, 0, 0).release(owner)
            out.setdefault(name, []).append(owner)
    return out
