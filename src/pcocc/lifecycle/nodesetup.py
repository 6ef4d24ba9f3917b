"""`pcocc internal setup init|create|delete|cleanup`: the privileged part of a job on a node.

Run as root by the SPANK plugin (create when a job's --vm step starts on the
node, delete from the job's epilog, once every step of the job is gone, or at
once when create failed), under a node-wide lock. The node publishes its
state in the store (network-config -> complete, or failed with the reason)
where the launcher waits for it.

Under SLURM, create also records the job's VM run directory on this node
(<the tasks' run dir>/job_<id>, found from PCOCC_TASK_<VAR>, the tasks' own
variables passed by the plugin), so that delete removes what a killed task
left there.

Every host object is recorded in the job's undo log (networks/undo.py) before
it is made: delete replays the job's log, cleanup every job's, and create
first replays the logs of jobs SLURM no longer runs (a setup that was killed),
so nothing of theirs is in the way of the next job.

Which VMs a node hosts comes from the SPANK plugin: PCOCC_LOCAL_RANKS (the
global task ids of the step's tasks on this node, which are the VM ranks)
and SLURM_STEP_NODELIST (the step's nodes, for the tunnels between them).
"""

import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import signal
import stat
import time

from pcocc import state
from pcocc.cluster import settings_runs
from pcocc.errors import CommandError, PcoccError, UsageError
from pcocc.networks import jobnet
from pcocc.networks.undo import UndoLog
from pcocc.runner import run

log = logging.getLogger("pcocc.setup")


def node_state_dir(env):
    return env.environ.get("PCOCC_NODE_STATE_DIR", "/var/run/pcocc")


@contextlib.contextmanager
def node_lock(env):
    d = node_state_dir(env)
    os.makedirs(d, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(d, "setup.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _user(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise UsageError(f"no user with uid {uid}") from None


def _node_key(ctx, user, jobid):
    return state.node_key(user, jobid, ctx.hostname)


def create(ctx, jobid, uid, tasks, ranks=None, step_nodes=None, alive=None, task_environ=None):
    """Set this node up for the job; publish complete, or failed with the reason.

    ranks: the VM ranks of this node; step_nodes: the step's nodes (default: this one);
    alive: f(jobid) -> bool, the batch system's view of jobs (default: SLURM's, `liveness`);
    task_environ: the tasks' own variables that place their run dir ({PCOCC_RUN_DIR, HOME...});
    when given, the job's run dir on this node is recorded for delete to remove.
    """
    user = _user(uid)
    key = _node_key(ctx, user, jobid)
    if ctx.config.batch.settings["etcd-auth-type"] == "password" and ctx.config.batch.store == "etcd":
        from pcocc.store.etcdauth import ensure_user

        ensure_user(ctx.store, user)  # the user's first job: its etcd account and role
    record = {"state": "network-config", "tasks": tasks}
    ctx.store.put(key, record)
    started = time.monotonic()
    alive = alive or liveness(ctx)
    nodes = step_nodes or [ctx.hostname]
    watch = _interrupt_when_ending(jobid) if ctx.config.batch.type == "slurm" else contextlib.nullcontext()
    try:
        with watch:
            node_plan = _plan(ctx, jobid, user, ranks, alive, multi_node=len(nodes) > 1)
            record.update(node_plan.record())
            ctx.store.put(key, record)
            peers = {}
            if node_plan.endpoint:
                ctx.store.put(state.peer_key(user, jobid, ctx.hostname), node_plan.record())
                peers = jobnet.wait_peers(ctx.store, state.peers_prefix(user, jobid), nodes, ctx.hostname, alive, jobid)
            waited = time.monotonic()
            with node_lock(ctx.env):
                _reclaim_dead(ctx, jobid, alive)
                if task_environ is not None:
                    path = task_run_dir(task_environ, uid, jobid)
                    undo_log(ctx.env).record(jobid, "run-dir", path=path, uid=uid, alternates=[
                        p for p in task_run_dirs(task_environ, uid, jobid) if p != path])
                common = dict(jobid=jobid, uid=uid, host=ctx.hostname, nodes=nodes, environ=ctx.env.environ, store=ctx.store,
                              undo=undo_log(ctx.env), owner_alive=_owner_alive(ctx, alive), nodes_key=_nodes_key(user, jobid),
                              state_dir=node_state_dir(ctx.env), address=_address(ctx, node_plan))
                record["objects"] = jobnet.setup_node(node_plan, peers, common)
            # seconds waiting for the cluster's record and the other nodes, then making things
            record["timings"] = {"wait": round(waited - started, 3), "create": round(time.monotonic() - waited, 3)}
    except (PcoccError, OSError) as exc:
        reason = getattr(exc, "message", None) or f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": ")
        ctx.store.put(key, {**record, "state": "failed", "error": reason})
        _peer_failed(ctx, user, jobid, reason)
        raise PcoccError(f"node setup failed on {ctx.hostname}: {reason}") from None
    ctx.store.put(key, {**record, "state": "complete"})


class JobEnded(PcoccError):
    """The job was cancelled (or ended) while its node setup ran."""


WATCH_PERIOD = 5.0  # seconds between two looks at the job's state during a node setup


@contextlib.contextmanager
def _interrupt_when_ending(jobid):
    """Interrupt the main thread (JobEnded, through SIGALRM) once SLURM says the job ends.

    A step's processes are not signalled before its tasks start (slurmstepd has no process
    container yet), so a scancel would otherwise wait for the whole setup, up to the plugin's
    timeout. The command under way is killed (subprocess.run kills its child on any exception).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()
    ended = []

    def expired(signum, frame):
        if ended:
            raise JobEnded(f"job {jobid} was cancelled during its node setup ({ended[0]})")

    def watch():
        while not done.wait(WATCH_PERIOD):
            try:
                out = run(["squeue", "-a", "-h", "-j", str(jobid), "-o", "%T"], timeout=30, check=False)
            except CommandError:
                continue
            # a job SLURM does not know (an admin's or a test's own setup) is left alone
            state = out.stdout.split()[0] if out.stdout.split() else None
            if state in _ENDING and not done.is_set():
                ended.append(state)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
                return

    previous = signal.signal(signal.SIGALRM, expired)
    watcher = threading.Thread(target=watch, daemon=True, name="job-watch")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.signal(signal.SIGALRM, previous)


def _plan(ctx, jobid, user, ranks, alive, multi_node):
    if not ctx.config.networks:  # no network anywhere: no need for the cluster's record
        return jobnet.NodePlan()
    info = jobnet.wait_info(ctx.store, user, jobid, alive)
    if ranks is None:
        if any(jobnet.vm_networks(ctx.config, settings) for _, settings, _, _ in settings_runs(info)):
            raise PcoccError("the VM ranks of this node are unknown (PCOCC_LOCAL_RANKS, set by the SPANK plugin)")
        ranks = []
    return jobnet.plan(ctx.config, info, ranks, ctx.env.environ, ctx.hostname, multi_node)


def _address(ctx, node_plan):
    """Where this node's reverse NAT ports are reached: $PCOCC_HOST_ADDR, else SLURM's NodeAddr.
    On one host, the address every job's uplink has here (from this host only, whatever its network)."""
    environ = ctx.env.environ
    if environ.get("PCOCC_HOST_ADDR"):
        return environ["PCOCC_HOST_ADDR"]
    if not node_plan.networks:
        return None
    if ctx.config.batch.type == "local":
        from pcocc.networks.gateway import LINK_ADDR

        return LINK_ADDR
    return jobnet.node_address(environ, ctx.hostname)


class DeadlineExceeded(PcoccError):
    """The teardown ran out of its time in the middle of an undo step."""


@contextlib.contextmanager
def _hard_deadline(seconds):
    """Raise DeadlineExceeded in the main thread once `seconds` have passed (SIGALRM);
    a command running then is killed by the runner (subprocess.run kills its child on any exception)."""
    if not seconds:
        yield None
        return

    def expired(signum, frame):
        raise DeadlineExceeded(f"teardown deadline of {seconds:g} s reached")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield time.monotonic() + seconds
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def delete(ctx, jobid, uid, deadline=None, failure=None):
    """Undo what create did for the job on this node (idempotent).

    failure: the message of a create that failed (the SPANK plugin gives it, also for a
    create killed before it could record anything): once undone, the node's record says
    failed with it, so that the job's other nodes and its launcher stop waiting for this
    one (jobnet.wait_peers, launcher.wait_started); the epilog's delete removes it.

    deadline: seconds this may take in all (None: no bound). Once passed, the step
    under way is interrupted (its command killed) and nothing more is tried: what is
    left stays in the undo log (the next setup on the node, or `cleanup`, replays it)
    and the UndoError raised names it. Raises UndoError, or a StoreError that kept
    nothing from being undone.
    """
    user = _user(uid)
    with _hard_deadline(deadline) as until, node_lock(ctx.env):
        # Our node record goes first: a node that gives back a shared id checks that no other
        # node of the job still has one, so the last node out always sees none.
        try:
            ctx.store.delete(_node_key(ctx, user, jobid))
            ctx.store.delete(state.peer_key(user, jobid, ctx.hostname))
        except PcoccError as exc:  # the store is away: the node's own objects go all the same
            log.warning("job %s: cannot delete this node's record: %s", jobid, exc.message)
        try:
            undo_log(ctx.env).replay(jobid, undo_actions(ctx), deadline=until)
        finally:
            if failure:
                _record_failure(ctx, user, jobid, failure)


def _record_failure(ctx, user, jobid, failure):
    reason = failure  # the bare reason, as create records it: readers say which node failed
    for prefix in ("pcocc: error: ", f"node setup failed on {ctx.hostname}: "):
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
    try:
        ctx.store.put(_node_key(ctx, user, jobid), {"state": "failed", "error": reason})
    except PcoccError as exc:
        log.warning("job %s: cannot record this node's failure: %s", jobid, exc.message)
    _peer_failed(ctx, user, jobid, reason)


def _peer_failed(ctx, user, jobid, reason):
    """Tells the peers waiting for this node's endpoint (jobnet.wait_peers) that it failed."""
    try:
        ctx.store.put(state.peer_key(user, jobid, ctx.hostname), {"state": "failed", "error": reason})
    except PcoccError as exc:
        log.warning("job %s: cannot tell the peers of this node's failure: %s", jobid, exc.message)


VM_FINAL_STATES = ("stopped", "failed")


def task_exit(ctx, jobid, uid, rank, status):
    """A VM task ended without saying how (SPANK task_exit: killed by a signal, or a crash).

    Marks VM `rank` of the job failed with the reason from `status` (a wait status), unless
    its record already holds an end; writes a record if the VM never published one, but
    only while the cluster's record exists (a cluster already ended keeps no trace).
    Returns the new record, or None when there was nothing to mark.
    """
    from pcocc.procs import wait_status_text

    user = _user(uid)
    reason = wait_status_text(status)
    key = state.vm_key(user, jobid, rank)

    def mark(cur):
        if cur is None:
            if ctx.store.get(state.cluster_prefix(user, jobid) + "info") is None:
                return None
            cur = {"rank": rank, "name": f"vm{rank}", "host": ctx.hostname}
        if cur.get("state") in VM_FINAL_STATES:
            return cur
        return {**cur, "state": "failed", "error": reason}

    before = ctx.store.get(key)
    after = ctx.store.update(key, mark)
    if after and after != before and after.get("state") == "failed":
        log.error("job %s: vm%d: %s", jobid, rank, reason)
        return after
    return None


def init(ctx):
    """Prepare this node; with etcd password authentication, turn it on (once, idempotent).

    Root's etcd password is <system conf dir>/etcd-password (0400), made here if absent;
    the same file must then be copied to every node.
    """
    with node_lock(ctx.env):
        os.makedirs(node_state_dir(ctx.env), mode=0o755, exist_ok=True)
    settings = ctx.config.batch.settings
    if ctx.config.batch.store == "etcd" and settings["etcd-auth-type"] == "password":
        from pcocc.store import etcd, etcdauth

        password = etcdauth.read_or_create_password(etcdauth.root_password_path(ctx.env))
        ca = settings.get("etcd-ca-cert") if settings.get("etcd-protocol") == "https" else None
        store = etcd.EtcdStore(etcd.endpoint_urls(settings), ca_cert=ca)  # no credentials: auth may be off yet
        try:
            etcdauth.enable_auth(store, password)
        finally:
            store.close()


def cleanup(ctx):
    """Undo every job's setup on this node (after a crash or for maintenance); under SLURM, then
    give back the cluster-wide ids of every job that is gone (allocator.sweep, all nodes' jobs)."""
    from pcocc import allocator

    with node_lock(ctx.env):
        log_ = undo_log(ctx.env)
        actions = undo_actions(ctx)
        errors = []
        for job in log_.jobs():
            try:
                log_.replay(job, actions)
            except PcoccError as exc:
                errors.append(exc.message)
        if ctx.config.batch.type == "slurm":  # the local backend reclaims through its own owners
            try:
                allocator.sweep(ctx.store, _owner_alive(ctx, liveness(ctx)))
            except PcoccError as exc:
                errors.append(f"the id pools could not be swept: {exc.message}")
        if errors:
            raise PcoccError("; ".join(errors))


def undo_log(env):
    return UndoLog(node_state_dir(env))


def undo_actions(ctx):
    """{kind: undo} of everything a node setup records: the networks' objects and the job's run dir."""
    return {**jobnet.undo_actions(ctx.env.environ, ctx.store), "run-dir": remove_run_dir}


TASK_VARS = ("PCOCC_RUN_DIR", "XDG_RUNTIME_DIR", "TMPDIR", "HOME")  # what the plugin passes as PCOCC_TASK_<VAR>


def task_environ(environ):
    """The tasks' own variables the SPANK plugin passed (PCOCC_TASK_<VAR>), or None if it passed none."""
    found = {var: environ[f"PCOCC_TASK_{var}"] for var in TASK_VARS if f"PCOCC_TASK_{var}" in environ}
    return found or None


def task_run_dir(task_env, uid, jobid):
    """Where the job's VM tasks of user uid keep their files on this node: <their run dir>/job_<jobid>.

    Their run dir by the rule of Environment.run_dir (fsutil): $PCOCC_RUN_DIR, else
    $XDG_RUNTIME_DIR/pcocc when that is a private directory of uid's, else /tmp/pcocc-<uid> (or
    ~/.cache/pcocc/run-<host> when another user took it: fsutil.default_run_dir); found without
    creating anything (Environment.run_dir creates it, which root must not do).
    """
    from pcocc.fsutil import default_run_dir

    return os.path.join(default_run_dir(task_env, uid), f"job_{int(jobid)}")


def task_run_dirs(task_env, uid, jobid):
    """Every place task_run_dir may be when the tasks apply the rule themselves, later
    (fsutil.run_dir_candidates: another user may make or remove /tmp/pcocc-<uid> between)."""
    from pcocc.fsutil import run_dir_candidates

    return [os.path.join(d, f"job_{int(jobid)}") for d in run_dir_candidates(task_env, uid)]


def remove_run_dir(path, uid, alternates=()):
    """Remove a job's run dir (`<run dir>/job_<N>`) with the rights of its user, uid (idempotent),
    once no process of uid names a file in it (procs.kill_processes_naming: they are killed);
    and the same at each of `alternates`, the other places the job's tasks may have put it
    (task_run_dirs).

    Left alone, with a warning: a path not named job_<N>, or whose parent or itself is not
    a directory of uid's (a symlink included). The removal runs with uid's effective ids and
    no supplementary group, so it can remove nothing the user could not; it follows no link.
    """
    for other in alternates:
        _remove_run_dir(other, uid)
    _remove_run_dir(path, uid)


def _remove_run_dir(path, uid):
    parent, name = os.path.split(os.path.normpath(path))
    if not name.startswith("job_") or not name[4:].isdigit():
        log.warning("not a job run dir, left alone: %s", path)
        return
    from pcocc.procs import kill_processes_naming

    left = kill_processes_naming(path, uid)  # a qemu still exiting after its task was killed
    if left:
        log.warning("run dir %s: processes %s still there after SIGKILL", path, ", ".join(map(str, left)))
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:  # a symlink (ELOOP), not a directory...
        log.warning("run dir %s left alone: its parent: %s", path, exc.strerror)
        return
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        owner = os.fstat(pfd).st_uid
        if owner != uid or st.st_uid != uid or not stat.S_ISDIR(st.st_mode):
            log.warning("run dir %s left alone: not a directory of uid %d's", path, uid)
            return
        with _as_user(uid, pwd.getpwuid(uid).pw_gid):
            shutil.rmtree(name, dir_fd=pfd, onerror=lambda fn, p, exc: log.warning("run dir %s: %s: %s", path, p, exc[1]))
    finally:
        os.close(pfd)


@contextlib.contextmanager
def _as_user(uid, gid):
    """File system access with uid's and gid's rights (effective ids, no supplementary groups), then root's again."""
    if os.geteuid() != 0:
        yield
        return
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def _nodes_key(user, jobid):
    return state.nodes_prefix(user, jobid)


def _reclaim_dead(ctx, jobid, alive):
    """Replay the logs of jobs that no longer run here (a setup killed before its delete)."""
    log_ = undo_log(ctx.env)
    for job in log_.jobs():
        if job != jobid and not alive(job):
            log.info("job %s is gone: undoing what its setup left on this node", job)
            try:
                log_.replay(job, undo_actions(ctx))
            except PcoccError as exc:  # its leftovers stay recorded; they only matter if in the way
                log.warning("%s", exc.message)


# SLURM job states after which nothing of the job runs any more
_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
          "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}


_ENDING = _ENDED | {"COMPLETING"}  # a cancelled job is COMPLETING until its processes and epilogs are done


def job_alive(jobid):
    """Whether SLURM still knows the job as pending, running or ending; True when it cannot tell."""
    try:
        # -a: jobs of hidden partitions too (for squeue they are not there otherwise)
        out = run(["squeue", "-a", "-h", "-j", str(jobid), "-o", "%T"], timeout=30).stdout.split()
    except CommandError as exc:
        return "Invalid job id" not in exc.stderr
    return bool(out) and out[0] not in _ENDED


def liveness(ctx):
    """f(jobid) -> whether the job still runs, as SLURM sees it. The local backend,
    which sits above this module, passes its own view to `create` instead."""
    return job_alive


def _owner_alive(ctx, alive):
    """For the id pools: whether the job of an owner "JOBID:..." runs (with SLURM: one squeue, on first use)."""
    if ctx.config.batch.type == "local":
        return lambda owner: alive(int(str(owner).split(":")[0]))
    live = []

    def alive(owner):
        if not live:
            try:
                out = run(["squeue", "-a", "-h", "-o", "%i %T"], timeout=30).stdout
                live.append({f[0] for f in map(str.split, out.splitlines()) if len(f) == 2 and f[1] not in _ENDED})
            except CommandError:
                live.append(None)  # cannot tell: reclaim nothing
        jobid = str(owner).split(":")[0]
        if live[0] is None or jobid in live[0]:
            return True
        # not in the snapshot: a job that started after it looks dead too; ask about it alone
        return not jobid.isdigit() or job_alive(int(jobid))

    return alive
