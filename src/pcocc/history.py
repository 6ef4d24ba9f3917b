"""The history of a user's ended virtual clusters, as sacct(1) keeps the accounting of ended jobs.

One record per ended cluster, in the store under the user's prefix
(state.history_key: /pcocc/users/<user>/history/<jobid>), apart from the live
records of running clusters (state.clusters_prefix), so that `pcocc ps` never
lists an ended cluster and the records of a cluster can all go at its end.

A record (a dict; every time in seconds since the epoch, float):

    jobid        int     the job id (local: the user's counter; SLURM: its job id)
    uuid         str     the cluster's uuid (Backend.cluster_info), or None
    name         str     the job name
    user         str     the owner
    definition   str     the cluster definition (tiny:3)
    backend      str     "local" or "slurm"
    host         str     where it ran (local: the host; SLURM: the launcher's host), or None
    state        str     how it ended: one of END_STATES (sacct(1)'s names for the same ends)
    reason       str     why, in words (the failed VM and its error, the script's status, the cancel), or None
    error        str     the reason when the cluster failed, else None (what `batch --wait` reports)
    exit_code    int     the batch or alloc script's exit status, or None when there was none
    vms          list    [{"name": "vm0", "host": str or None, "state": str, "error": str or None}] per VM, by rank
    submitted    float   when it was submitted
    started      float   when its VMs were started (local: its supervisor ran; SLURM: its launcher), or None
    ended        float   when it ended

Pruning, at each write (so the history needs no daemon): records older than
MAX_AGE (7 days, by their end) go, then the oldest ends beyond MAX_ENTRIES
(1,000) per user. Each record is also written with a store TTL of MAX_AGE, so a
user who never ends another cluster still loses it after 7 days. A job id that
comes again (a new SLURM controller, a removed state.db) replaces the older
record of that id.

Errors: store errors propagate (StoreError, PermissionDenied); callers at a
cluster's end log them rather than fail the end.
"""

import time

from pcocc import state

MAX_AGE = 7 * 24 * 3600  # seconds a record is kept after its cluster's end
MAX_ENTRIES = 1000  # records kept per user (the most recent ends)

# sacct(1) JOB STATE CODES that a virtual cluster's end can have.
COMPLETED = "COMPLETED"  # its script or shell ended with status 0, every VM stopped by itself, or ckpt stopped it
FAILED = "FAILED"  # a VM or the node setup failed, the script ended with a non-zero status, or its owners died
CANCELLED = "CANCELLED"  # stopped by `pcocc cancel` or scancel(1)
TIMEOUT = "TIMEOUT"  # its batch system's time limit was reached
END_STATES = (COMPLETED, FAILED, CANCELLED, TIMEOUT)


def make_record(info, vms, end_state, reason=None, exit_code=None, started=None, ended=None):
    """The history record of a cluster from its live records, before they are deleted.

    info: the cluster's info record (Backend.cluster_info; may be None when it was never
    written: then a record with what is known); vms: [vm record] (state, error, host,
    name); end_state: one of END_STATES; reason: str or None; exit_code: the script's status
    or None; started/ended: epoch seconds (default: info["started"] / now).
    Raises ValueError for an unknown end state.
    """
    if end_state not in END_STATES:
        raise ValueError(f"unknown end state {end_state!r} (one of {', '.join(END_STATES)})")
    info = info or {}
    now = time.time() if ended is None else ended
    by_rank = {v.get("rank", i): v for i, v in enumerate(vms or [])}
    from pcocc.cluster import vm_count

    n = max(vm_count(info), len(by_rank))
    vm_list = []
    for rank in range(n):
        v = by_rank.get(rank, {})
        vm_list.append({"name": v.get("name", f"vm{rank}"), "host": v.get("host"),
                        "state": v.get("state", "pending"), "error": v.get("error")})
    return {
        "jobid": info.get("jobid"), "uuid": info.get("uuid"), "name": info.get("name"), "user": info.get("owner"),
        "definition": info.get("definition"), "backend": info.get("backend"),
        "host": info.get("host") or info.get("launcher_host"),
        "state": end_state, "reason": reason, "error": reason if end_state != COMPLETED else None,
        "exit_code": exit_code, "vms": vm_list,
        "submitted": info.get("created"), "started": started if started is not None else info.get("started"), "ended": now,
    }


def record(store, user, entry, now=None):
    """Write one ended cluster's record (make_record's dict; entry["jobid"] an int), then prune.

    Returns the number of older records pruned. Store errors propagate.
    """
    if not isinstance(entry.get("jobid"), int):
        raise ValueError("a history record needs an integer jobid")
    store.put(state.history_key(user, entry["jobid"]), entry, ttl=MAX_AGE)
    return prune(store, user, now=now)


def record_cluster(store, user, jobid, end_state, reason=None, exit_code=None, started=None, vms=None):
    """Record the end of cluster `jobid` from its live records in the store (read here), then prune.

    The one call a backend makes at a cluster's end, before it deletes the cluster's records
    (state.cluster_prefix). vms: the VM records if the caller has them (default: read).
    Returns the record written. Store errors propagate.
    """
    prefix = state.cluster_prefix(user, jobid)
    items = store.range(prefix)
    info = items.get(prefix + "info") or {"jobid": jobid, "owner": user}
    if vms is None:
        vms = [v for k, v in items.items() if k.startswith(prefix + "vms/")]
    entry = make_record({**info, "jobid": jobid}, vms, end_state, reason, exit_code, started)
    record(store, user, entry)
    return entry


def get(store, user, jobid):
    """The record of ended cluster `jobid`, or None."""
    return store.get(state.history_key(user, jobid))


def list_records(store, user, jobids=None, since=None, until=None, states=None, name=None):
    """The user's records, oldest end first, filtered like sacct(1).

    jobids: iterable of ints (-j); since/until: epoch seconds, as sacct's -S/-E: a record is
    kept when the cluster ran at some time in [since, until] (ended at or after since,
    submitted at or before until); states: iterable of END_STATES (-s); name: job name (--name).
    """
    out = []
    wanted = set(jobids) if jobids else None
    wanted_states = {s.upper() for s in states} if states else None
    for value in store.range(state.history_prefix(user)).values():
        if not isinstance(value, dict):
            continue
        if wanted is not None and value.get("jobid") not in wanted:
            continue
        if since is not None and (value.get("ended") or 0) < since:
            continue
        if until is not None and (value.get("submitted") or value.get("ended") or 0) > until:
            continue
        if wanted_states is not None and value.get("state") not in wanted_states:
            continue
        if name is not None and value.get("name") != name:
            continue
        out.append(value)
    return sorted(out, key=lambda r: (r.get("ended") or 0, r.get("jobid") or 0))


def prune(store, user, now=None, max_age=None, max_entries=None):
    """Delete the user's records whose cluster ended more than max_age s ago (default MAX_AGE),
    then the oldest beyond max_entries (default MAX_ENTRIES). Returns how many were deleted."""
    now = time.time() if now is None else now
    max_age = MAX_AGE if max_age is None else max_age
    max_entries = MAX_ENTRIES if max_entries is None else max_entries
    items = store.range(state.history_prefix(user))
    keep, gone = [], []
    for key, value in items.items():
        ended = value.get("ended") if isinstance(value, dict) else None
        if not isinstance(ended, (int, float)) or now - ended > max_age:
            gone.append(key)
        else:
            keep.append((ended, key))
    keep.sort()
    if len(keep) > max_entries:
        gone += [key for _, key in keep[: len(keep) - max_entries]]
    for key in gone:
        store.delete(key)
    return len(gone)


def script_end(status, what):
    """(end state, reason, exit code) of a cluster that ended with its script or shell.

    status: the script's exit status (int; negative: killed by that signal, as subprocess
    reports it); what: its name in the reason ("batch script", "allocation's shell", ...).
    """
    if status is not None and status < 0:
        return FAILED, f"the {what} was killed by signal {-status}", status
    return (COMPLETED if status == 0 else FAILED), f"the {what} exited with status {status}", status


def launcher_end(signals=(), error=None, script=None, status=None):
    """(end state, reason, exit code) of a SLURM cluster, from what its launcher saw.

    signals: the signals it got (scancel: SIGTERM; Ctrl-C: SIGINT; salloc revoked: SIGHUP), in
    order; error: the PcoccError message that ended it, or None; script: the name of its script
    or shell ("batch script", "host script", "allocation's shell") when one ran to its end, with
    its exit status; status: that status, or for a cluster without a script srun's.
    A signal wins (CANCELLED: scancel(1) and the time limit both send it), then an error
    (FAILED), then the script's status; a cluster without one COMPLETED when srun ended with 0.
    """
    import signal as _signal

    if signals:
        sig = signals[0]
        name = _signal.Signals(sig).name if sig in _signal.valid_signals() else str(sig)
        return CANCELLED, f"its launcher got {name} (scancel, the time limit, or Ctrl-C)", None
    if error:
        return FAILED, error, None
    if script:
        return script_end(status, script)
    if status == 0:
        return COMPLETED, "every VM stopped", None
    return FAILED, f"the VMs' step ended with status {status}", None
