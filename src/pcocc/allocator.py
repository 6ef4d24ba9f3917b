"""Cluster-wide allocation of unique ids (VXLAN ids, PKeys, host ports, IPs) in the store.

One key per pool holds {id: owner job}; every change is a compare-and-swap,
retried on conflict, so that any number of nodes allocate at once without a
lock. Entries of dead jobs (alive(owner) false) are reclaimed as we go.
"""

from pcocc import state
from pcocc.errors import ResourceError


class Pool:
    def __init__(self, store, name, first, last):
        self.store = store
        self.name = name
        self.first, self.last = first, last
        self.key = state.pool_key(name)

    def allocate(self, owner, count=1, alive=None):
        """count ids for owner (the ones it holds already count); ResourceError when the pool is full."""
        owner = str(owner)
        got = []

        def take(current):
            table = {int(k): v for k, v in (current or {}).items()}
            if alive is not None:
                table = {i: o for i, o in table.items() if o == owner or alive(o)}
            mine = sorted(i for i, o in table.items() if o == owner)
            need = count - len(mine)
            if need > 0:
                free = (i for i in range(self.first, self.last + 1) if i not in table)
                new = [i for _, i in zip(range(need), free)]
                if len(new) < need:
                    raise ResourceError(f"no free {self.name} left ({self.first}-{self.last}: {len(table)} in use)")
                table.update((i, owner) for i in new)
                mine += new
            got[:] = mine[:count]
            return {str(i): o for i, o in sorted(table.items())}

        self.store.update(self.key, take)
        return got

    def release(self, owner):
        owner = str(owner)
        self.store.update(self.key, lambda cur: {k: o for k, o in (cur or {}).items() if o != owner} or None)

    def owners(self):
        return {int(k): v for k, v in (self.store.get(self.key) or {}).items()}
