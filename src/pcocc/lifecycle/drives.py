"""Multi-mount protection of persistent drives: a drive attached read-write by one cluster at a time.

pcocc-templates.yaml(5), persistent-drives, `mmp`: `yes` (the default: the drive is
attached once), `cluster` (by several VMs of one cluster), `no` (no protection). As in
the original, the lock is a record in the user's part of the store, one per drive (its
real path), so that the protection holds between the user's clusters on every node; it
does not hold between users (another user's store is not readable: a shared drive is
protected by its file permissions only, as the original says).

The record: {"path", "jobid", "ranks": [VM ranks holding it]}. A VM takes its drives
before qemu starts and gives them back when it ends; a cluster that died without giving
them back (SIGKILL, a lost node) is detected by its owner's liveness (the batch system's
view of the job, `Backend.job_alive`) and its lock is taken over.
"""

import hashlib
import logging
import os

from pcocc import state
from pcocc.errors import PcoccError

log = logging.getLogger("pcocc.lifecycle.drives")


def mmp_mode(value):
    """The protection of a drive: "yes", "cluster" or "no", from the template's `mmp`
    (YAML gives true/false for yes/no)."""
    if value is True or value == "yes":
        return "yes"
    if value is False or value == "no" or value is None:
        return "no"
    return "cluster"


def lock_key(user, path):
    """The store key of the lock of the drive at `path` (its real path, hashed: any
    character may be in a path, a key stays short)."""
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    return f"{state.user_prefix(user)}mmp/{digest}"


def take(store, user, jobid, rank, drives, job_alive):
    """Take the locks of a VM's persistent drives before qemu opens them.

    drives: [(path, mmp value)]; job_alive(jobid) -> bool. Returns the paths locked (to
    give back with `release`). Raises PcoccError naming the cluster that holds a drive
    (and releases what this call took).
    """
    taken = []
    try:
        for path, mmp in drives:
            mode = mmp_mode(mmp)
            if mode == "no":
                continue
            real = os.path.realpath(path)

            def claim(cur, real=real, mode=mode):
                if cur is None or (cur.get("jobid") != jobid and not job_alive(cur.get("jobid"))):
                    if cur is not None:
                        log.info("drive %s: its lock by cluster %s, which ended, is taken over", real, cur.get("jobid"))
                    return {"path": real, "jobid": jobid, "ranks": [rank], "mode": mode}
                if cur.get("jobid") == jobid:
                    if rank in cur.get("ranks", []):
                        return cur
                    if mode == "cluster" and cur.get("mode") == "cluster":
                        return {**cur, "ranks": sorted({*cur.get("ranks", []), rank})}
                    holders = ", ".join(f"vm{r}" for r in cur.get("ranks", []))
                    raise PcoccError(f"persistent drive {real} is already attached to {holders} of this cluster "
                                     "(mmp: yes; use mmp: cluster to share it between the VMs of one cluster)")
                raise PcoccError(f"persistent drive {real} is already attached to cluster {cur.get('jobid')} "
                                 "(mmp protection: end that cluster first, or set mmp: no)")

            store.update(lock_key(user, real), claim)
            taken.append(real)
    except BaseException:
        release(store, user, jobid, rank, taken)
        raise
    return taken


def release(store, user, jobid, rank, paths):
    """Give back a VM's drive locks (the record goes with its last holder). A lock that
    another cluster took over meanwhile is left to it. Errors are logged, not raised: the
    VM is ending, and a lock left behind is taken over once this cluster is gone."""
    for real in paths:
        def give(cur):
            if cur is None or cur.get("jobid") != jobid:
                return cur
            ranks = [r for r in cur.get("ranks", []) if r != rank]
            return {**cur, "ranks": ranks} if ranks else None

        try:
            store.update(lock_key(user, real), give)
        except PcoccError as exc:
            log.warning("drive %s: its lock could not be released: %s", real, exc.message)
