"""The single-host backend: plays salloc/srun on this machine, without SLURM.

`submit` reserves cores and memory on this host in the store, then starts a
detached supervisor process that forks one process per VM (the same code
`pcocc internal run` runs under SLURM), waits for them, and cleans up when the
cluster ends: on cancel (SIGTERM to the supervisor), when every VM stopped,
or when a batch script finished.
"""

import contextlib
import logging
import os
import signal
import sys
import time

from pcocc import state
from pcocc.batch.base import Backend
from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, ResourceError, TimeoutExpired
from pcocc.procs import pid_alive, process_start

log = logging.getLogger("pcocc.local")

SUPERVISOR_START_TIMEOUT = 30
CANCEL_TIMEOUT = 60
FAILED_LINGER = 2.0  # seconds a cluster whose VM failed stays recorded after it stops, for its waiters


def host_capacity():
    """(cores usable by us, memory in MiB we allow VMs to take)."""
    cores = sorted(os.sched_getaffinity(0))
    with open("/proc/meminfo") as f:
        total_kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
    return cores, int(total_kb / 1024 * 0.9)


class LocalBackend(Backend):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.overcommit = ctx.config.batch.settings["cpu-overcommit"]

    # -- resources
    def _reserve(self, jobid, n_vms, cpus_per_vm, mem_per_vm):
        cores, mem_cap = host_capacity()
        key = state.reservations_key(self.ctx.hostname)
        placed = {}

        def take(current):
            live = {j: r for j, r in (current or {}).items() if pid_alive(r["pid"])}
            use = {c: 0 for c in cores}
            mem_used = 0
            for r in live.values():
                mem_used += r["memory_mb"]
                for vm_cores in r["cores"]:
                    for c in vm_cores:
                        if c in use:
                            use[c] += 1
            if mem_used + n_vms * mem_per_vm > mem_cap:
                raise ResourceError(
                    f"not enough memory on this host: {n_vms} VM(s) of {mem_per_vm} MiB need {n_vms * mem_per_vm} MiB, "
                    f"{max(mem_cap - mem_used, 0)} MiB free"
                )
            alloc = []
            for _ in range(n_vms):
                free = sorted((c for c in cores if use[c] < self.overcommit), key=lambda c: (use[c], c))
                if len(free) < cpus_per_vm:
                    slots = sum(self.overcommit - use[c] for c in cores)
                    raise ResourceError(
                        f"not enough cores on this host: {n_vms} VM(s) of {cpus_per_vm} core(s) do not fit "
                        f"({len(cores)} cores, {self.overcommit} vCPUs per core at most, {slots} vCPU slots free)"
                    )
                mine = free[:cpus_per_vm]
                for c in mine:
                    use[c] += 1
                alloc.append(mine)
            placed["cores"] = alloc
            # Pinning helps only on cores of one's own: when this job shares any, let the host balance.
            placed["exclusive"] = all(use[c] == 1 for vm_cores in alloc for c in vm_cores)
            live[str(jobid)] = {"pid": os.getpid(), "cores": alloc, "memory_mb": n_vms * mem_per_vm}
            return live

        self.ctx.store.update(key, take)
        return placed["cores"], placed["exclusive"]

    def _release(self, jobid):
        key = state.reservations_key(self.ctx.hostname)
        self.ctx.store.update(key, lambda cur: {j: r for j, r in (cur or {}).items() if j != str(jobid)} or None)

    def _adopt(self, jobid, pid):
        key = state.reservations_key(self.ctx.hostname)

        def change(cur):
            cur = dict(cur or {})
            if str(jobid) in cur:
                cur[str(jobid)] = {**cur[str(jobid)], "pid": pid}
            return cur

        self.ctx.store.update(key, change)

    # -- jobs
    def submit(self, vms, resolved, opts):
        """Start a cluster; return its job id once its supervisor runs.

        vms: [VMSpec]; resolved: {template name: Resolved}; opts: dict with
        name, cpus, mem_per_core, user_data, script (run in vm0), cwd.
        """
        store = self.ctx.store
        jobid = store.update(state.user_prefix(self.user) + "next-jobid", lambda v: (v or 0) + 1)
        cpus, mem = opts["cpus"], opts["mem_per_core"] * opts["cpus"]
        rundir = os.path.join(run_root(self.ctx.env), f"job_{jobid}")
        try:
            os.mkdir(rundir, 0o700)
        except FileExistsError:
            raise PcoccError(f"{rundir} exists already: another pcocc configuration uses this run directory? Set PCOCC_RUN_DIR") from None
        try:
            cores, exclusive = self._reserve(jobid, len(vms), cpus, mem)
            info = self.cluster_info(jobid, vms, resolved, opts, backend="local", host=self.ctx.hostname, rundir=rundir)
            networked = _networked(self.ctx, info)
            if networked and os.geteuid() != 0:
                raise PermissionDenied("on the local backend, only root can start VMs on networks (node setup makes "
                                       "bridges, namespaces and NAT rules): use a resource set without networks")
            for vm in info["vms"]:
                vm.update(cores=cores[vm["rank"]], memory_mb=mem, pin=exclusive)
            self.write_credentials(jobid, [self.ctx.control_host])
            store.put(state.cluster_prefix(self.user, jobid) + "info", info)
            if networked:  # the node setup SLURM's plugin would run, as root (checked above); errors reach the user
                from pcocc.lifecycle import nodesetup

                nodesetup.create(self.ctx, jobid, os.getuid(), len(info["vms"]), networked, [self.ctx.hostname], alive=self.job_alive)
            self._start_supervisor(jobid)
        except BaseException:
            self._cleanup(jobid, rundir)
            raise
        return jobid

    def _start_supervisor(self, jobid):
        self.ctx.close_store()
        pid = os.fork()
        if pid == 0:  # child: detach, fork the supervisor, exit
            try:
                os.setsid()
                if os.fork() == 0:
                    _supervise(self.ctx, jobid)  # never returns
                os._exit(0)
            except BaseException:
                os._exit(1)
        os.waitpid(pid, 0)
        info = self.ctx.store.wait(
            state.cluster_prefix(self.user, jobid) + "info", lambda items: any(v.get("supervisor") for v in items.values()), SUPERVISOR_START_TIMEOUT
        )
        if info is None:
            raise TimeoutExpired(f"the supervisor of cluster {jobid} did not start")

    def _cleanup(self, jobid, rundir):
        import shutil

        self._undo_setup(jobid)
        self.ctx.store.delete_prefix(state.cluster_prefix(self.user, jobid))
        self._release(jobid)
        if rundir:
            shutil.rmtree(rundir, ignore_errors=True)

    def _undo_setup(self, jobid):
        """Undo the job's node setup (its networks) if it has one: only root's clusters do."""
        from pcocc.lifecycle import nodesetup

        if os.geteuid() == 0 and nodesetup.undo_log(self.ctx.env).entries(jobid):
            nodesetup.delete(self.ctx, jobid, os.getuid())

    def _supervisor_alive(self, info):
        return pid_alive(info.get("supervisor"), info.get("supervisor_start"))

    def _here(self, info, what):
        if info.get("host") not in (None, self.ctx.hostname):
            raise PcoccError(f"cluster {info['jobid']} runs on {info['host']}: {what} it there")

    def jobs(self, user=None):
        prefix = state.clusters_prefix(self.user)
        out = []
        for key in self.ctx.store.range(prefix):
            if key.endswith("/info"):
                jobid = int(key[len(prefix):].split("/")[0])
                with contextlib.suppress(NotFoundError):
                    info, vms = self.job(jobid)
                    if info.get("host") == self.ctx.hostname and info.get("supervisor") and not self._supervisor_alive(info) and info["state"] != "ending":
                        # The supervisor died without cleaning (SIGKILL, reboot): reclaim now.
                        self._cleanup(jobid, info["rundir"])
                        continue
                    out.append((info, vms))
        return sorted(out, key=lambda j: j[0]["jobid"])

    def job_alive(self, jobid):
        info = self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "info")
        return info is not None and (info.get("host") != self.ctx.hostname or self._supervisor_alive(info))

    def cancel(self, jobid, wait=True):
        info, _ = self.job(jobid)
        self._here(info, "cancel")
        if self._supervisor_alive(info):
            os.kill(info["supervisor"], signal.SIGTERM)
        if not wait:
            return
        deadline = time.monotonic() + CANCEL_TIMEOUT
        while self._supervisor_alive(info) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._supervisor_alive(info):
            raise TimeoutExpired(f"cluster {jobid} did not stop in {CANCEL_TIMEOUT} s")
        if self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "info") is not None:
            self._cleanup(jobid, info["rundir"])  # the supervisor died before cleaning


def run_root(env):
    from pcocc.fsutil import private_dir

    return private_dir(env.run_dir)


def _supervise(ctx, jobid):
    """The supervisor process of a local cluster (runs detached; exits when the cluster ends)."""
    status, children, prefix = 1, {}, state.cluster_prefix(ctx.env.user, jobid)
    try:
        info = ctx.reopen_store().get(prefix + "info")
        _detach_stdio(os.path.join(info["rundir"], "supervisor.log"))
        stopping = []
        signal.signal(signal.SIGTERM, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGINT, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        backend = LocalBackend(ctx)
        backend._adopt(jobid, os.getpid())
        ctx.close_store()
        children = {_fork_vm(ctx, jobid, vm["rank"]): vm["rank"] for vm in info["vms"]}
        ctx.store.put(prefix + "info", {**info, "supervisor": os.getpid(), "supervisor_start": process_start(os.getpid()), "state": "running"})
        script = _ScriptRunner(backend, jobid, info) if info.get("script") else None
        while children and not stopping and not (script and script.done):
            _reap(children)
            if script:
                script.poll()
            time.sleep(0.1)
        status = 0 if script is None or script.status == 0 else 1
    except BaseException as exc:  # noqa: BLE001 - whatever happened, the cluster is cleaned below
        log.error("supervisor of cluster %s: %s", jobid, getattr(exc, "message", exc))
    finally:
        try:
            _stop_vms(ctx, prefix, children)
            if any(vm.get("state") == "failed" for vm in ctx.store.range(prefix + "vms/").values()):
                time.sleep(FAILED_LINGER)  # so that whoever waits for the cluster (batch --wait) reads why
            info = ctx.store.get(prefix + "info")  # its cleanup undoes the node setup too
            LocalBackend(ctx)._cleanup(jobid, info["rundir"] if info else None)
        except BaseException as exc:  # noqa: BLE001
            log.error("cleanup of cluster %s: %s", jobid, getattr(exc, "message", exc))
        finally:
            os._exit(status)


def _networked(ctx, info):
    """The ranks of the VMs that are on a network."""
    from pcocc.networks import jobnet

    return [vm["rank"] for vm in info["vms"] if jobnet.vm_networks(ctx.config, vm["settings"])]


def _detach_stdio(logfile):
    logf = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def _fork_vm(ctx, jobid, rank):
    """A child process running one VM (the same code as `pcocc internal run`)."""
    from pcocc.lifecycle.vmrun import run_vm

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = run_vm(ctx, jobid, rank)
        except BaseException as exc:  # noqa: BLE001 - the VM process must never raise past here
            log.error("vm%d: %s", rank, getattr(exc, "message", exc))
        finally:
            os._exit(code)
    return pid


def _reap(children):
    while children:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if not pid:
            return
        children.pop(pid, None)


def _stop_vms(ctx, prefix, children):
    """SIGTERM the VM processes, wait for them, then SIGKILL what is left, qemu included."""
    with contextlib.suppress(Exception):
        ctx.store.update(prefix + "info", lambda i: i and {**i, "state": "ending"})
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 45
    while children and time.monotonic() < deadline:
        _reap(children)
        time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _kill_leftover_qemu(ctx.store, prefix)


class _ScriptRunner:
    """The batch script, run in vm0 once every VM runs, in a thread: cancel must not wait for it."""

    def __init__(self, backend, jobid, info):
        self.backend, self.jobid, self.info = backend, jobid, info
        self.thread, self.status = None, None

    @property
    def done(self):
        return self.status is not None

    def poll(self):
        if self.thread is not None:
            return
        _, vms = self.backend.job(self.jobid)
        if any(v["state"] in ("failed", "stopped") for v in vms):
            self.status = 1
        elif all(v["state"] == "running" for v in vms):
            import threading

            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        from pcocc.context import Context

        try:
            backend = LocalBackend(Context(self.backend.ctx.env, self.backend.ctx.config))  # its own store connection
            code, out, err = backend.run_script_in_vm(self.jobid, self.info["script"])
            with open(os.path.join(self.info.get("cwd") or os.getcwd(), f"pcocc_{self.jobid}.out"), "wb") as f:
                f.write(out)
                f.write(err)
            self.status = code
        except BaseException as exc:  # noqa: BLE001
            log.error("batch script: %s", getattr(exc, "message", exc))
            self.status = 1


def _kill_leftover_qemu(store, prefix):
    for vm in store.range(prefix + "vms/").values():
        qpid = vm.get("qemu_pid")
        if pid_alive(qpid):
            try:
                with open(f"/proc/{qpid}/cmdline", "rb") as f:
                    is_qemu = b"qemu" in f.read()
            except OSError:
                is_qemu = False
            if is_qemu:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(qpid, signal.SIGKILL)
