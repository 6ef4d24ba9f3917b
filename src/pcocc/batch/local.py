"""The single-host backend: plays salloc/srun on this machine, without SLURM.

`submit` records the cluster, reserves cores and memory on this host (for all
users: `hostres`), then starts a detached supervisor process that forks one
process per VM (the same code `pcocc internal run` runs under SLURM), waits for
them, and cleans up when the cluster ends: on cancel (SIGTERM to the
supervisor), when every VM stopped, when a batch script finished, or when the
process holding the cluster (`pcocc alloc`, or a `batch` still submitting) is
gone.

Every process may die at any moment (SIGKILL, SIGHUP, Ctrl-C), so each object
has an owner whose death is detected, and one reclaim path:
- the cluster record names its supervisor and, while submitting or for alloc,
  its holder, each as (pid, start time): when both are gone, the next `ps`,
  `cancel` or `wait` reclaims it (`_reclaim`: VM processes, qemu, node setup,
  records, reservation, run dir);
- a VM process dies with its supervisor, and qemu with its VM process
  (PR_SET_PDEATHSIG), so a SIGKILLed supervisor leaves no VM running;
- a VM process that dies without saying why is marked failed by the
  supervisor, with its exit status.
"""

import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time

from pcocc import history, phases, state
from pcocc.batch.base import Backend
from pcocc.batch.hostres import HostReservations
from pcocc.cluster import settings_runs, vm_count
from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, ResourceError
from pcocc.procs import pid_alive, process_start, set_parent_death_signal, wait_status_text

log = logging.getLogger("pcocc.local")

SUPERVISOR_CHECK = 1.0  # seconds between two looks at a starting supervisor
CANCEL_TIMEOUT = 90  # seconds for the supervisor to stop its VMs (45 s) and undo its node setup before it is killed
VM_STOP_TIMEOUT = 45
OWNER_CHECK = 1.0  # seconds between two looks of the supervisor at its holder and record
FINAL_STATES = ("stopped", "failed")


def host_capacity():
    """(cores usable by us, memory in MiB we allow VMs to take: 90% of MemTotal)."""
    cores = sorted(os.sched_getaffinity(0))
    with open("/proc/meminfo") as f:
        total_kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
    return cores, int(total_kb / 1024 * 0.9)


def _me():
    return [os.getpid(), process_start(os.getpid())]


def _alive(owner):
    """Whether an owner [pid, start] (or None) still runs."""
    return bool(owner) and bool(owner[0]) and pid_alive(owner[0], owner[1])


def _owner(record, name):
    """[pid, start] of the process a record names under `name` and `name`_start, or None.

    (Two plain fields rather than a pair, so that scripts read the pid as they always did.)
    """
    pid = record.get(name) if record else None
    return [pid, record.get(f"{name}_start")] if pid else None


def _named(name, owner):
    return {name: owner[0], f"{name}_start": owner[1]}


def place(cores, use, overcommit, n_vms, cpus_per_vm):
    """Cores for n_vms VMs of cpus_per_vm vCPUs each, least used first: [[core, ...] per VM].

    use: {core: vCPUs placed on it already}, updated in place. Raises ResourceError
    with the free vCPU slots counted before this request (not after part of it).
    """
    slots = sum(max(overcommit - use[c], 0) for c in cores)
    alloc = []
    for _ in range(n_vms):
        free = sorted((c for c in cores if use[c] < overcommit), key=lambda c: (use[c], c))
        if len(free) < cpus_per_vm:
            raise ResourceError(
                f"not enough cores on this host: {n_vms} VM(s) of {cpus_per_vm} core(s) do not fit "
                f"({len(cores)} cores, {overcommit} vCPUs per core at most, {slots} vCPU slots free)"
            )
        mine = free[:cpus_per_vm]
        for c in mine:
            use[c] += 1
        alloc.append(mine)
    return alloc


class LocalBackend(Backend):
    def __init__(self, ctx):
        super().__init__(ctx)
        settings = ctx.config.batch.settings
        self.overcommit = settings["cpu-overcommit"]
        self.reservations = HostReservations(settings["reservation-dir"])

    # -- resources
    def _reserve(self, rundir, n_vms, cpus_per_vm, mem_per_vm, owners):
        """Reserve cores and memory for a cluster (key: its run dir); ([[core] per VM], exclusive)."""
        cores, mem_cap = host_capacity()
        placed = {}

        def take(live, mine):
            use = {c: 0 for c in cores}
            mem_used = 0
            for _, _, r in live:
                mem_used += r["memory_mb"]  # entries checked by hostres.valid_entry
                for vm_cores in r["cores"]:
                    for c in vm_cores:
                        if c in use:
                            use[c] += 1
            if mem_used + n_vms * mem_per_vm > mem_cap:
                raise ResourceError(
                    f"not enough memory on this host: {n_vms} VM(s) of {mem_per_vm} MiB need {n_vms * mem_per_vm} MiB, "
                    f"{max(mem_cap - mem_used, 0)} MiB free (for all users)"
                )
            alloc = place(cores, use, self.overcommit, n_vms, cpus_per_vm)
            placed["cores"] = alloc
            # Pinning helps only on cores of one's own: when this job shares any, let the host balance.
            placed["exclusive"] = all(use[c] == 1 for vm_cores in alloc for c in vm_cores)
            return {**mine, rundir: {"owners": owners, "cores": alloc, "memory_mb": n_vms * mem_per_vm}}

        self.reservations.change(take)
        return placed["cores"], placed["exclusive"]

    def _release(self, rundir):
        self.reservations.change(lambda live, mine: {k: v for k, v in mine.items() if k != rundir})

    def _adopt(self, rundir, owner):
        """Add owner [pid, start] to the processes that hold the reservation."""

        def change(live, mine):
            if rundir in mine:
                mine[rundir] = {**mine[rundir], "owners": [*mine[rundir]["owners"], owner]}
            return mine

        self.reservations.change(change)

    # -- jobs
    def submit(self, vms, resolved, opts):
        """Start a cluster; return its job id once its supervisor runs.

        vms: [VMSpec]; resolved: {template name: Resolved}; opts: dict with
        name, cpus, mem_per_core, user_data, script (run in vm0), cwd, and hold
        (True for alloc: the cluster ends when this process does).
        """
        if not opts.get("restart"):  # a restart boots the checkpoint's revisions, checked by check_restart
            self.check_images(vms, resolved)
        store = self.ctx.store
        jobid = store.update(state.user_prefix(self.user) + "next-jobid", lambda v: (v or 0) + 1)
        cpus, mem = opts["cpus"], opts["mem_per_core"] * opts["cpus"]
        rundir = os.path.join(run_root(self.ctx.env), f"job_{jobid}")
        info = self.cluster_info(jobid, vms, resolved, opts, backend="local", host=self.ctx.hostname, rundir=rundir,
                                 state="submitting", **_named("holder", _me()))
        networked = _networked(self.ctx, info)
        if networked and os.geteuid() != 0:
            raise PermissionDenied("on the local backend, only root can start VMs on networks (node setup makes "
                                   "bridges, namespaces and NAT rules): use a resource set without networks")
        info_key = state.cluster_prefix(self.user, jobid) + "info"
        # Recorded before anything exists, so that whatever follows has an owner to reclaim it by.
        store.put(info_key, info)
        supervisor = None
        try:
            try:
                os.mkdir(rundir, 0o700)
            except FileExistsError:
                raise PcoccError(f"{rundir} exists already: another pcocc configuration uses this run directory? "
                                 "Set PCOCC_RUN_DIR") from None
            cores, exclusive = self._reserve(rundir, len(vms), cpus, mem, [_me()])
            info["placement"] = {"cores": cores, "memory_mb": mem, "pin": exclusive}  # read by cluster.vm_spec
            self.write_credentials(jobid, [self.ctx.control_host])
            store.put(info_key, info)
            if networked:  # the node setup SLURM's plugin would run, as root (checked above); errors reach the user
                from pcocc.lifecycle import nodesetup

                nodesetup.create(self.ctx, jobid, os.getuid(), vm_count(info), networked, [self.ctx.hostname],
                                 alive=self.job_alive)
            supervisor = self._start_supervisor(jobid, info_key)
            if not opts.get("hold"):  # submitted: the cluster no longer depends on this process
                self.ctx.store.update(info_key, lambda i: i and {k: v for k, v in i.items() if k not in ("holder", "holder_start")})
        except BaseException:
            current = self.ctx.store.get(info_key)
            supervisor = supervisor or _owner(current, "supervisor")  # forked, not yet seen running
            if supervisor and _alive(supervisor):
                self._stop_supervisor(jobid, supervisor)  # it owns the cleanup from its start on
            else:  # refused or interrupted before it ran: the caller gets the error, the history no record
                self._reclaim(jobid, current or info, record=False)
            raise
        return jobid

    def _start_supervisor(self, jobid, info_key):
        """Fork the detached supervisor; its [pid, start] once it has recorded itself."""
        self.ctx.close_store()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: detach, fork the supervisor, tell its pid, exit
            try:
                os.close(rfd)
                os.setsid()
                sup = os.fork()
                if sup == 0:
                    os.close(wfd)
                    _supervise(self.ctx, jobid)  # never returns
                os.write(wfd, str(sup).encode())
                os._exit(0)
            except BaseException:
                os._exit(1)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            data = r.read()
        os.waitpid(pid, 0)
        if not data:
            raise PcoccError(f"the supervisor of cluster {jobid} could not be started")
        sup = int(data)
        supervisor = [sup, process_start(sup)]
        # The supervisor records itself too; whoever is first, the record names it from now on.
        self.ctx.store.update(info_key, lambda i: i and (i if i.get("supervisor") else {**i, **_named("supervisor", supervisor)}))
        # No fixed deadline: on a loaded host the start may be slow; it is over when the
        # supervisor says it runs, or when it is gone.
        while self.ctx.store.wait(info_key, lambda items: any(v.get("state") != "submitting" for v in items.values()),
                                  SUPERVISOR_CHECK) is None:
            if not _alive(supervisor):
                raise PcoccError(f"the supervisor of cluster {jobid} ended as it started")
        return supervisor

    def _stop_supervisor(self, jobid, supervisor, timeout=CANCEL_TIMEOUT):
        """SIGTERM the supervisor and wait for it to clean; SIGKILL it and reclaim after timeout s."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor[0], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(supervisor):
            log.warning("cluster %s: its supervisor did not stop in %d s: killing it", jobid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor[0], signal.SIGKILL)
        info = self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "info")
        if info is not None:  # the supervisor died before cleaning
            self._reclaim(jobid, info)

    def _reclaim(self, jobid, info, record=True):
        """Remove everything of a cluster whose owners are gone: VM processes and qemu, node setup,
        records, reservation, run dir. Idempotent: it may run twice, or after a crash. record:
        whether its end goes to the history (not for a submission that failed: its caller says why)."""
        prefix = state.cluster_prefix(self.user, jobid)
        _kill_vm_processes(self.ctx.store, prefix)
        _kill_host_command(info)
        if info.get("cleanup_error"):
            log.warning("cluster %s: its supervisor's cleanup failed (%s): finished now", jobid, info["cleanup_error"])
        end = info.get("end") or {}  # the supervisor had decided how it ended, then died while cleaning
        if end.get("state") in history.END_STATES:
            self._cleanup(jobid, info.get("rundir"), reason=end.get("reason"), end_state=end["state"],
                          exit_code=end.get("exit_code"), record=record)
            return
        self._cleanup(jobid, info.get("rundir"), reason="its supervisor (or the process submitting it) ended without cleaning up",
                      record=record)

    def _cleanup(self, jobid, rundir, reason=None, end_state=None, exit_code=None, record=True):
        """Undo the node setup, record how the cluster ended (pcocc.history, and the batch script's
        output file), delete its records, free its share.

        end_state: one of history.END_STATES (None: COMPLETED, or FAILED with a reason); a failed
        VM makes a COMPLETED end FAILED; a cancel's request (info["end_request"], written by
        cancel()) wins over a plain signal's CANCELLED.
        """
        import shutil

        self._undo_setup(jobid)
        prefix = state.cluster_prefix(self.user, jobid)
        items = self.ctx.store.range(prefix)
        info = items.get(prefix + "info") or {}
        vms = [v for k, v in items.items() if k.startswith(prefix + "vms/")]
        failed = [v for v in vms if v.get("state") == "failed"]
        request = info.get("end_request") or {}
        if request and end_state in (None, history.CANCELLED):
            end_state, reason = request.get("state", history.CANCELLED), request.get("reason") or reason
            exit_code = request.get("exit_code", exit_code)
        if end_state is None:
            end_state = history.FAILED if reason else history.COMPLETED
        if failed and end_state == history.COMPLETED:
            end_state = history.FAILED
        if failed and end_state == history.FAILED:
            why = f"{failed[0].get('name')} failed: {failed[0].get('error', 'unknown reason')}"
            reason = why if not reason or reason == "every VM stopped" else f"{reason}; {why}"
        if record and info.get("uuid"):  # a second cleanup of the same cluster (a reclaim racing its end) records nothing
            with contextlib.suppress(Exception):
                done = history.get(self.ctx.store, self.user, jobid)
                record = not (isinstance(done, dict) and done.get("uuid") == info["uuid"])
        if record and (info.get("script") or info.get("host_script")) and info.get("cwd"):
            _append_end(os.path.join(info["cwd"], f"pcocc_{jobid}.out"), jobid, end_state, reason)
        try:  # first: a second cleanup (a reclaim racing this one) sees it and records nothing
            if record:
                history.record(self.ctx.store, self.user, history.make_record({**info, "jobid": jobid}, vms, end_state, reason, exit_code))
        except Exception as exc:  # noqa: BLE001 - the cluster's end must not stop for its history
            log.warning("cluster %s: its end was not recorded in the history: %s", jobid, getattr(exc, "message", exc))
        if rundir:  # before the records go: nothing may remain that no record names
            shutil.rmtree(rundir, ignore_errors=True)
            try:
                self._release(rundir)
            except ResourceError as exc:  # harmless: a reservation whose owners are gone counts for no one
                log.warning("cluster %s: its reservation stays in the host's files until the next write: %s", jobid, exc.message)
        self.ctx.store.delete_prefix(prefix)

    def _undo_setup(self, jobid):
        """Undo the job's node setup (its networks) if it has one: only root's clusters do."""
        from pcocc.lifecycle import nodesetup

        if os.geteuid() == 0 and nodesetup.undo_log(self.ctx.env).entries(jobid):
            nodesetup.delete(self.ctx, jobid, os.getuid())

    def _owners_alive(self, info):
        """Whether the cluster's supervisor (or, before it has one, its holder) runs."""
        if info.get("supervisor"):
            return _alive(_owner(info, "supervisor"))
        return _alive(_owner(info, "holder"))

    def _here(self, info, what):
        if info.get("host") not in (None, self.ctx.hostname):
            raise PcoccError(f"cluster {info['jobid']} runs on {info['host']}: {what} it there")

    def job(self, jobid):
        """(info, vms) as Backend.job; a cluster of this host whose owners are gone is reclaimed first."""
        info, vms = super().job(jobid)
        if info.get("host") == self.ctx.hostname and not self._owners_alive(info):
            self._reclaim(jobid, info)
            raise NotFoundError(f"no virtual cluster with job id {jobid} (it ended: its supervisor was gone)", "See 'pcocc ps'.")
        return info, vms

    def jobs(self, user=None):
        prefix = state.clusters_prefix(self.user)
        out = []
        for key in self.ctx.store.range(prefix):
            if key.endswith("/info"):
                jobid = int(key[len(prefix):].split("/")[0])
                with contextlib.suppress(NotFoundError):
                    out.append(self.job(jobid))
        return sorted(out, key=lambda j: j[0]["jobid"])

    def all_jobs(self):
        """[(info, vms)] of every user's clusters on this host (ps -a): the caller's own from its
        store; other users' (whose stores are theirs) as their reservations of this host's cores
        and memory show them: job id, owner, number of VMs, state "running"."""
        import pwd

        out = self.jobs()
        mine = {os.path.realpath(i.get("rundir") or "") for i, _ in out}
        for uid, key, entry in self.reservations.all_live():
            if uid == os.getuid() and os.path.realpath(key) in mine:
                continue
            try:
                user = pwd.getpwuid(uid).pw_name
            except KeyError:
                user = str(uid)
            base = os.path.basename(str(key))
            jobid = int(base[4:]) if base.startswith("job_") and base[4:].isdigit() else None
            n = len(entry["cores"])
            info = {"jobid": jobid, "name": "?", "owner": user, "definition": "?", "state": "running", "host": self.ctx.hostname,
                    "created": None, "vms": [{} for _ in range(n)], "nodes": {}}
            out.append((info, [{"rank": r, "name": f"vm{r}", "state": "?", "host": self.ctx.hostname} for r in range(n)]))
        return out

    def job_alive(self, jobid):
        info = self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "info")
        return info is not None and (info.get("host") != self.ctx.hostname or self._owners_alive(info))

    def cancel(self, jobid, wait=True, end_state="CANCELLED", reason=None, exit_code=None):
        """Stop a cluster (SIGTERM to its supervisor, which stops its VMs and cleans up); with wait,
        until it is gone. end_state, reason, exit_code: how its history records the end (default:
        CANCELLED, "cancelled by <user>"; alloc records its shell's end)."""
        info, _ = self.job(jobid)
        self._here(info, "cancel")
        self.request_end(jobid, end_state, reason, exit_code)
        supervisor = _owner(info, "supervisor")
        if not supervisor:  # still submitting: stop the submitting process, then reclaim what it left
            holder = _owner(info, "holder")
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder[0], signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(holder) and time.monotonic() < deadline:
                time.sleep(0.05)
            info = self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "info")
            supervisor = _owner(info, "supervisor")
            if not supervisor:
                if info is not None:
                    self._reclaim(jobid, info)
                return
        if not wait:
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor[0], signal.SIGTERM)
            return
        self._stop_supervisor(jobid, supervisor)


def run_root(env):
    from pcocc.fsutil import private_dir

    return private_dir(env.run_dir)


def _supervise(ctx, jobid):
    """The supervisor process of a local cluster (runs detached; exits when the cluster ends)."""
    status, children, prefix, script, host = 1, {}, state.cluster_prefix(ctx.env.user, jobid), None, None
    end_state, reason, exit_code = history.FAILED, "its supervisor failed", None
    info_key = prefix + "info"
    me = _me()
    try:
        stopping = []
        signal.signal(signal.SIGTERM, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGINT, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        store = ctx.reopen_store()
        # Recorded first: from here on this process owns the cluster's cleanup.
        info = store.update(info_key, lambda i: i and (i if i.get("supervisor") else {**i, **_named("supervisor", me)}))
        if not info or _owner(info, "supervisor") != me:
            os._exit(1)  # reclaimed meanwhile (its submitter died), or not ours
        _detach_stdio(os.path.join(info["rundir"], "supervisor.log"))
        backend = LocalBackend(ctx)
        backend._adopt(info["rundir"], me)
        ctx.close_store()
        if not stopping:
            children = {_fork_vm(ctx, jobid, rank): rank for rank in range(vm_count(info))}
        store = ctx.store
        started = time.time()
        store.update(info_key, lambda i: i and {**i, "state": "running", "started": started})
        script = _ScriptRunner(backend, jobid, info) if info.get("script") else None
        host = _HostRunner(backend, jobid, info) if info.get("host_script") else None
        checked = 0.0
        end_state, reason = None, None
        # the cluster ends with its batch script (-b), else with its host command (-E), as in the original pcocc
        while children and not stopping and not (script and script.done) and not (host and not script and host.done):
            for pid, code in _reap(children):
                _vm_process_ended(store, prefix, pid, code)
            if script:
                script.poll()
            if host:
                host.poll()
            if time.monotonic() - checked > OWNER_CHECK:
                checked = time.monotonic()
                current = store.get(info_key)
                if current is None:
                    log.error("cluster %s: its record is gone: stopping", jobid)
                    end_state, reason = history.FAILED, "its record in the store was gone"
                    break
                holder = _owner(current, "holder")
                if holder and not _alive(holder):
                    log.info("cluster %s: the process holding it (pid %s) is gone: stopping", jobid, holder[0])
                    end_state, reason = history.CANCELLED, f"the process holding it (pid {holder[0]}) ended"
                    break
            time.sleep(0.1)
        ender = script or host
        status = 0 if ender is None or ender.status == 0 else 1
        if end_state is None:
            end_state, reason, exit_code = _end_of(stopping, script, children, host)
    except BaseException as exc:  # noqa: BLE001 - whatever happened, the cluster is cleaned below
        log.error("supervisor of cluster %s: %s", jobid, getattr(exc, "message", exc))
        end_state, reason = history.FAILED, f"its supervisor failed: {getattr(exc, 'message', exc)}"
    finally:
        try:
            if host is not None:  # still running when the batch script ended (or the cluster was stopped)
                host.stop()
            _stop_vms(ctx, prefix, children, end={"state": end_state, "reason": reason, "exit_code": exit_code})
            info = ctx.store.get(info_key)  # its cleanup undoes the node setup too
            LocalBackend(ctx)._cleanup(jobid, info["rundir"] if info else None, reason=reason, end_state=end_state,
                                       exit_code=exit_code)
        except BaseException as exc:  # noqa: BLE001
            # supervisor.log goes with the run dir that the reclaim removes: the record keeps the why
            why = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            log.exception("cleanup of cluster %s: %s", jobid, why)
            with contextlib.suppress(BaseException):
                ctx.store.update(info_key, lambda i: i and {**i, "cleanup_error": why})
        finally:
            os._exit(status)


def _end_of(stopping, script, children, host=None):
    """(end state, reason, script exit status) of a supervisor's loop that ended by itself:
    by a signal, its batch script's end (-b), its host command's end (-E, without -b), or its VMs'."""
    if stopping:
        name = signal.Signals(stopping[0]).name if stopping[0] in signal.valid_signals() else str(stopping[0])
        return history.CANCELLED, f"its supervisor got {name}", None
    for runner, what in ((script, "batch script"), (host if script is None else None, "host script")):
        if runner is not None and runner.done:
            if runner.error:
                return history.FAILED, runner.error, runner.code
            if runner.code is None:
                return history.FAILED, f"the {what} did not run: a VM ended first", None
            state_ = history.COMPLETED if runner.code == 0 else history.FAILED
            return state_, f"the {what} exited with status {runner.code}", runner.code
    if not children:
        return history.COMPLETED, "every VM stopped", None
    return history.FAILED, "its supervisor stopped", None


def _append_end(path, jobid, end_state, reason):
    """Append the cluster's end to its batch script's output file (pcocc_<jobid>.out), safely (open_output)."""
    line = f"pcocc: cluster {jobid} ended: {end_state}" + (f" ({reason})" if reason else "") + "\n"
    try:
        # once only: a second cleanup of the same cluster (a reclaim racing its end on a loaded host)
        # must not add an end of its own after the first one
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.lseek(fd, max(0, os.fstat(fd).st_size - 4096), os.SEEK_SET)
                if f"pcocc: cluster {jobid} ended: ".encode() in os.read(fd, 4096):
                    return
            finally:
                os.close(fd)
        with open_output(path, truncate=False) as f:
            f.write(line.encode("utf-8", "backslashreplace"))
    except OSError as exc:
        log.warning("cluster %s: its end was not written to %s: %s", jobid, path, exc.strerror or exc)


def _networked(ctx, info):
    """The ranks of the VMs that are on a network."""
    from pcocc.networks import jobnet

    return [rank for _, settings, first, count in settings_runs(info) if jobnet.vm_networks(ctx.config, settings)
            for rank in range(first, first + count)]


def _detach_stdio(logfile):
    logf = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def _fork_vm(ctx, jobid, rank):
    """A child process running one VM (the same code as `pcocc internal run`); it dies with the supervisor."""
    from pcocc.lifecycle.vmrun import run_vm

    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # A SIGKILLed supervisor must not leave VMs running: SIGTERM stops this one cleanly.
            set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != parent:  # it died before the line above
                os._exit(1)
            code = run_vm(ctx, jobid, rank)
        except BaseException as exc:  # noqa: BLE001 - the VM process must never raise past here
            log.error("vm%d: %s", rank, getattr(exc, "message", exc))
        finally:
            os._exit(code)
    return pid


def _reap(children):
    """[(pid, wait status)] of the children that ended; they leave `children`. Only these
    children are waited for: the supervisor's other children (a batch -E host command) are
    their owners' to reap."""
    ended = []
    for pid in list(children):
        try:
            done, code = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours to wait for any more
            children.pop(pid, None)
            continue
        if done:
            children.pop(pid, None)
            ended.append((pid, code))
    return ended


def _vm_process_ended(store, prefix, pid, code):
    """A VM process ended: if it did not say how (SIGKILL, a crash), the VM failed, with the reason."""
    for key, vm in store.range(prefix + "vms/").items():
        if vm.get("pid") != pid:
            continue
        _kill_qemu(vm)  # its parent-death signal kills it too; this covers a qemu not yet told
        if vm.get("state") not in FINAL_STATES:
            reason = wait_status_text(code)
            log.error("%s: %s", vm.get("name"), reason)
            store.update(key, lambda cur: cur and (cur if cur.get("state") in FINAL_STATES else {**cur, "state": "failed", "error": reason}))


def _stop_vms(ctx, prefix, children, end=None):
    """SIGTERM the VM processes, wait for them, then SIGKILL what is left, qemu included.

    end: {"state", "reason", "exit_code"} as the supervisor decided it, kept in the cluster's
    record first: should the supervisor die before its cleanup is over, the reclaim that
    finishes it records that end, not a supervisor that "ended without cleaning up"."""
    with contextlib.suppress(Exception):
        ctx.store.update(prefix + "info", lambda i: i and {**i, "state": "ending", **({"end": end} if end else {})})
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + VM_STOP_TIMEOUT
    while children and time.monotonic() < deadline:
        _reap(children)
        time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _kill_vm_processes(ctx.store, prefix)


def _kill_qemu(vm):
    qemu = _owner(vm, "qemu_pid")
    if _alive(qemu):
        with contextlib.suppress(ProcessLookupError):
            os.kill(qemu[0], signal.SIGKILL)


def _kill_vm_processes(store, prefix, timeout=10.0):
    """SIGKILL the VM processes and qemus a cluster's records name (each by pid and start time),
    and wait until they are gone (bounded), so that none writes to the store after."""
    procs = []
    for vm in store.range(prefix + "vms/").values():
        for owner in (_owner(vm, "pid"), _owner(vm, "qemu_pid")):
            if _alive(owner):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(owner[0], signal.SIGKILL)
                procs.append(owner)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)


def open_output(path, truncate=True):
    """Open the batch script's output file for writing, as sbatch's --output would, safely in a
    shared directory: never through a symlink, never into a file of another user or one with
    other names (hard links); an existing file of ours is truncated (truncate=False: kept), and
    every write appends. Raises OSError."""
    # O_APPEND always: a batch -E host command and the -b script's output share the file, and
    # what one writes late must land after the other's, never over it
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_APPEND
    fd = os.open(path, flags, 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise PermissionError(1, "not a plain file of yours", path)
        if truncate:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


class _ScriptRunner:
    """The batch script, run in vm0 once every VM runs, in a thread: cancel must not wait for it."""

    def __init__(self, backend, jobid, info):
        self.backend, self.jobid, self.info = backend, jobid, info
        self.thread, self.status, self.error = None, None, None
        self.code = None  # the script's own exit status, once it ran

    @property
    def done(self):
        return self.status is not None

    def poll(self):
        if self.thread is not None:
            return
        _, vms = self.backend.job(self.jobid)
        if any(v["state"] in FINAL_STATES for v in vms):
            self.status = 1
        elif all(v["state"] == "running" for v in vms):
            import threading

            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        from pcocc.context import Context

        path = os.path.join(self.info.get("cwd") or os.getcwd(), f"pcocc_{self.jobid}.out")
        try:
            backend = LocalBackend(Context(self.backend.ctx.env, self.backend.ctx.config))  # its own store connection
            code, out, err = backend.run_script_in_vm(self.jobid, self.info["script"])
            self.code = code
            # after the host command's output (-E), which opened the file when the cluster started
            with open_output(path, truncate=not self.info.get("host_script")) as f:
                f.write(out)
                f.write(err)
            self.status = code
        except OSError as exc:  # kept in the cluster's end record: the user reads it with batch --wait
            self.error = f"the batch script's output was not written to {path}: {exc.strerror}"
            log.error("%s", self.error)
            self.status = 1
        except BaseException as exc:  # noqa: BLE001
            log.error("batch script: %s", getattr(exc, "message", exc))
            self.error = f"the batch script could not run in vm0: {getattr(exc, 'message', exc)}"
            self.status = 1


HOST_GRACE = 10  # seconds a host command (batch -E) has to end after SIGTERM


class _HostRunner:
    """batch -E on one host: the command line runs here once every VM runs, in its own session,
    with the cluster in its environment (pcocc.lifecycle.allocshell), its output going to
    pcocc_<jobid>.out as it comes (as sbatch's output file). Its process is recorded in the
    cluster's record (host_command, host_command_start), so that a reclaim stops it too."""

    def __init__(self, backend, jobid, info):
        self.backend, self.jobid, self.info = backend, jobid, info
        self.proc, self.status, self.error, self.code = None, None, None, None

    @property
    def done(self):
        return self.status is not None

    def poll(self):
        if self.status is not None:
            return
        if self.proc is not None:
            if self.proc.poll() is not None:
                self.code = self.status = self.proc.returncode
            return
        info, vms = self.backend.job(self.jobid)
        if any(v["state"] in FINAL_STATES for v in vms):
            self.status = 1
        elif all(phases.started(v, "qemu") for v in vms):  # as the original: once qemu runs, agents or not
            self._start(info, vms)

    def _start(self, info, vms):
        import shlex
        import subprocess

        from pcocc.lifecycle.allocshell import cluster_environ

        env = self.backend.ctx.env
        cwd = info.get("cwd") or os.getcwd()
        path = os.path.join(cwd, f"pcocc_{self.jobid}.out")
        try:
            with open_output(path) as out:
                environ = dict(env.environ, **cluster_environ(env, self.jobid, info.get("name"), info, vms))
                self.proc = subprocess.Popen(shlex.split(info["host_script"]), cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except (OSError, ValueError) as exc:
            self.error = f"the host script could not run: {getattr(exc, 'strerror', None) or exc}"
            log.error("%s", self.error)
            self.status = 1
            return
        owner = [self.proc.pid, process_start(self.proc.pid)]
        key = state.cluster_prefix(self.backend.user, self.jobid) + "info"
        self.backend.ctx.store.update(key, lambda i: i and {**i, **_named("host_command", owner)})

    def stop(self):
        """SIGTERM to the command's process group, SIGKILL after HOST_GRACE s (nothing if it ended)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + HOST_GRACE
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        _signal_group(self.proc.pid, signal.SIGKILL)  # what it started and left behind, too
        self.proc.wait()


def _signal_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill_host_command(info):
    """A reclaim's part: the host command (batch -E) of a cluster whose supervisor died, if it still runs."""
    owner = _owner(info, "host_command")
    if _alive(owner):
        _signal_group(owner[0], signal.SIGKILL)
