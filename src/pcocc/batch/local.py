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
from pcocc.errors import NotFoundError, PcoccError, ResourceError, TimeoutExpired

log = logging.getLogger("pcocc.local")

SUPERVISOR_START_TIMEOUT = 30
CANCEL_TIMEOUT = 60


def pid_alive(pid):
    """True for a running process (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def host_capacity():
    """(cores usable by us, memory in MiB we allow VMs to take)."""
    cores = sorted(os.sched_getaffinity(0))
    with open("/proc/meminfo") as f:
        total_kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
    return cores, int(total_kb / 1024 * 0.9)


class LocalBackend:
    def __init__(self, ctx):
        self.ctx = ctx
        self.user = ctx.env.user
        self.overcommit = int(ctx.config.batch.settings.get("cpu-overcommit") or 2)

    # -- resources
    def _reserve(self, jobid, n_vms, cpus_per_vm, mem_per_vm):
        cores, mem_cap = host_capacity()
        key = state.reservations_prefix(self.ctx.hostname) + "all"
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
            live[str(jobid)] = {"pid": os.getpid(), "cores": alloc, "memory_mb": n_vms * mem_per_vm}
            return live

        self.ctx.store.update(key, take)
        return placed["cores"]

    def _release(self, jobid):
        key = state.reservations_prefix(self.ctx.hostname) + "all"
        self.ctx.store.update(key, lambda cur: {j: r for j, r in (cur or {}).items() if j != str(jobid)} or None)

    def _adopt(self, jobid, pid):
        key = state.reservations_prefix(self.ctx.hostname) + "all"

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
        cores = self._reserve(jobid, len(vms), cpus, mem)
        rundir = os.path.join(run_root(self.ctx.env), f"job_{jobid}")
        try:
            os.makedirs(rundir, mode=0o700)
            info = {
                "jobid": jobid, "name": opts["name"], "owner": self.user, "backend": "local", "host": self.ctx.hostname,
                "definition": opts["definition"], "rundir": rundir, "created": time.time(), "state": "submitted",
                "user_data": opts.get("user_data"), "script": opts.get("script"), "cwd": opts.get("cwd"),
                "vms": [
                    {"rank": v.rank, "template": v.template, "settings": resolved[v.template].values, "cores": cores[v.rank], "memory_mb": mem}
                    for v in vms
                ],
            }
            self._write_credentials(jobid)
            store.put(state.cluster_prefix(self.user, jobid) + "info", info)
            self._start_supervisor(jobid)
        except BaseException:
            self._cleanup(jobid, rundir)
            raise
        return jobid

    def _write_credentials(self, jobid):
        from pcocc.agent import pki

        ca_cert, ca_key = pki.make_ca(f"pcocc cluster {jobid}")
        server_cert, server_key = pki.issue(ca_cert, ca_key, f"pcocc-{jobid}", server=True, ips=[self.ctx.control_host])
        client_cert, client_key = pki.issue(ca_cert, ca_key, self.user)
        text = lambda b: b.decode() if isinstance(b, bytes) else b  # noqa: E731
        prefix = state.cluster_prefix(self.user, jobid)
        self.ctx.store.put(prefix + "ca", {"cert": text(ca_cert), "key": text(ca_key), "server_cert": text(server_cert), "server_key": text(server_key)})
        self.ctx.store.put(prefix + "client", {"ca": text(ca_cert), "cert": text(client_cert), "key": text(client_key)})

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

        self.ctx.store.delete_prefix(state.cluster_prefix(self.user, jobid))
        self._release(jobid)
        shutil.rmtree(rundir, ignore_errors=True)

    def job(self, jobid):
        prefix = state.cluster_prefix(self.user, jobid)
        items = self.ctx.store.range(prefix)
        info = items.get(prefix + "info")
        if info is None:
            raise NotFoundError(f"no virtual cluster with job id {jobid}", "See 'pcocc ps'.")
        vms = {v["rank"]: v for k, v in items.items() if k.startswith(prefix + "vms/")}
        return info, [vms.get(i, {"rank": i, "name": f"vm{i}", "state": "pending"}) for i in range(len(info["vms"]))]

    def jobs(self):
        prefix = state.clusters_prefix(self.user)
        out = []
        for key in self.ctx.store.range(prefix):
            if key.endswith("/info"):
                jobid = int(key[len(prefix):].split("/")[0])
                with contextlib.suppress(NotFoundError):
                    info, vms = self.job(jobid)
                    if info.get("supervisor") and not pid_alive(info["supervisor"]) and info["state"] != "ending":
                        # The supervisor died without cleaning (SIGKILL, reboot): reclaim now.
                        self._cleanup(jobid, info["rundir"])
                        continue
                    out.append((info, vms))
        return sorted(out, key=lambda j: j[0]["jobid"])

    def find(self, jobid=None, name=None):
        """The job id a command acts on: -j, -J, $PCOCC_JOB_ID, or the only running cluster."""
        if jobid is not None:
            self.job(jobid)
            return jobid
        jobs = self.jobs()
        if name is not None:
            ids = [i["jobid"] for i, _ in jobs if i["name"] == name]
            if not ids:
                raise NotFoundError(f"no virtual cluster named '{name}'", "See 'pcocc ps'.")
            if len(ids) > 1:
                raise PcoccError(f"several clusters are named '{name}' (jobs {', '.join(map(str, ids))}): use -j")
            return ids[0]
        env_id = self.ctx.env.environ.get("PCOCC_JOB_ID")
        if env_id:
            return self.find(int(env_id))
        if len(jobs) == 1:
            return jobs[0][0]["jobid"]
        if not jobs:
            raise NotFoundError("you have no running virtual cluster", "Start one with 'pcocc batch' or 'pcocc alloc'.")
        raise PcoccError(f"you have {len(jobs)} virtual clusters: choose one with -j JOBID or -J NAME")

    def wait_ready(self, jobid, progress=None, timeout=None):
        """Wait until every VM is running; raise with the first VM's failure."""
        prefix = state.cluster_prefix(self.user, jobid)
        deadline = time.monotonic() + (timeout or 3600)
        last = None
        while True:
            info, vms = self.job(jobid)
            states = [v["state"] for v in vms]
            failed = [v for v in vms if v["state"] == "failed"]
            if failed:
                raise PcoccError(f"{failed[0]['name']} failed: {failed[0].get('error', 'unknown reason')}")
            if info["state"] in ("ending", "ended") or not pid_alive(info.get("supervisor")):
                raise PcoccError(f"cluster {jobid} ended before all its VMs ran")
            running = states.count("running")
            if progress and running != last:
                progress(running, len(vms))
                last = running
            if running == len(vms):
                return
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"cluster {jobid}: {running} of {len(vms)} VMs running after {timeout} s")
            self.ctx.store.wait(prefix, lambda items: True, 0.5)  # returns at once; the poll below is cheap
            time.sleep(0.05)

    def cancel(self, jobid, wait=True):
        info, _ = self.job(jobid)
        pid = info.get("supervisor")
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
        if not wait:
            return
        deadline = time.monotonic() + CANCEL_TIMEOUT
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            raise TimeoutExpired(f"cluster {jobid} did not stop in {CANCEL_TIMEOUT} s")
        if self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "info") is not None:
            self._cleanup(jobid, info["rundir"])  # the supervisor died before cleaning

    def credentials(self, jobid):
        return self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "client")


def run_root(env):
    """Short paths for unix sockets: /tmp/pcocc-<uid> (or $PCOCC_RUN_DIR)."""
    root = env.environ.get("PCOCC_RUN_DIR") or f"/tmp/pcocc-{env.uid}"
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def _supervise(ctx, jobid):
    """The supervisor process of a local cluster (runs detached; exits when the cluster ends)."""
    from pcocc.vmrun import run_vm

    status = 1
    try:
        store = ctx.reopen_store()
        backend = LocalBackend(ctx)
        prefix = state.cluster_prefix(ctx.env.user, jobid)
        info = store.get(prefix + "info")
        logf = os.open(os.path.join(info["rundir"], "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(logf, 1)
        os.dup2(logf, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr, force=True)
        stopping = []
        signal.signal(signal.SIGTERM, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGINT, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        backend._adopt(jobid, os.getpid())
        children = {}
        ctx.close_store()
        for vm in info["vms"]:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    code = run_vm(ctx, jobid, vm["rank"])
                except BaseException as exc:  # noqa: BLE001 - the VM process must never raise past here
                    log.error("vm%d: %s", vm["rank"], getattr(exc, "message", exc))
                finally:
                    os._exit(code)
            children[pid] = vm["rank"]
        store = ctx.store
        store.put(prefix + "info", {**info, "supervisor": os.getpid(), "state": "running"})
        script_done = None
        while children:
            if stopping:
                break
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid:
                    children.pop(pid, None)
                    continue
            if info.get("script") and script_done is None:
                script_done = _maybe_run_script(ctx, backend, jobid, info)
                if script_done is not None:
                    break
            time.sleep(0.1)
        store.put(prefix + "info", {**store.get(prefix + "info"), "state": "ending"})
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 45
        while children and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid:
                    children.pop(pid, None)
                    continue
            time.sleep(0.05)
        for pid in children:  # VM processes that did not stop: kill them and their qemu
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _kill_leftover_qemu(store, prefix)
        status = 0 if script_done in (None, 0) else 1
    except BaseException as exc:  # noqa: BLE001
        log.error("supervisor of cluster %s: %s", jobid, getattr(exc, "message", exc))
    finally:
        try:
            info = ctx.store.get(state.cluster_prefix(ctx.env.user, jobid) + "info")
            LocalBackend(ctx)._cleanup(jobid, info["rundir"] if info else os.path.join(run_root(ctx.env), f"job_{jobid}"))
        finally:
            os._exit(status)


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


def _maybe_run_script(ctx, backend, jobid, info):
    """Once every VM runs, run the batch script in vm0; its exit status, or None while waiting."""
    _, vms = backend.job(jobid)
    if any(v["state"] == "failed" for v in vms):
        return 1
    if not all(v["state"] == "running" for v in vms):
        return None
    from pcocc.agent.endpoint import ControlClient, decode_bytes, encode_bytes

    creds = backend.credentials(jobid)
    out_path = os.path.join(info.get("cwd") or os.getcwd(), f"pcocc_{jobid}.out")
    with open(info["script"], "rb") as f:
        script = f.read()
    with ControlClient(tuple(vms[0]["control"]), ca_pem=creds["ca"], cert_pem=creds["cert"], key_pem=creds["key"], timeout=None) as client:
        client.call("writefile", path="/tmp/pcocc-batch-script", data_b64=encode_bytes(script), mode=0o755)
        result = client.call("exec", argv=["/bin/sh", "/tmp/pcocc-batch-script"], timeout=10**7)
    with open(out_path, "wb") as f:
        f.write(decode_bytes(result["stdout_b64"]))
        f.write(decode_bytes(result["stderr_b64"]))
    return result["exit"]
