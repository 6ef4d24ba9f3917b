"""`pcocc internal setup init|create|delete|cleanup`: the privileged part of a job on a node.

Run as root by the SPANK plugin (create when a job's first --vm step starts on
the node, delete when it ends), under a node-wide lock. The node publishes its
state in the store (network-config -> complete, or failed with the reason)
where the launcher waits for it.

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
import time

from pcocc import state
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


def create(ctx, jobid, uid, tasks, ranks=None, step_nodes=None, alive=None):
    """Set this node up for the job; publish complete, or failed with the reason.

    ranks: the VM ranks of this node; step_nodes: the step's nodes (default: this one);
    alive: f(jobid) -> bool, the batch system's view of jobs (default: SLURM's, `liveness`).
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
    try:
        node_plan = _plan(ctx, jobid, user, ranks, alive, multi_node=len(nodes) > 1)
        record.update(node_plan.record())
        ctx.store.put(key, record)
        peers = {}
        if node_plan.endpoint:
            peers = jobnet.wait_peers(ctx.store, _nodes_key(user, jobid), nodes, ctx.hostname, alive, jobid)
        waited = time.monotonic()
        with node_lock(ctx.env):
            _reclaim_dead(ctx, jobid, alive)
            common = dict(jobid=jobid, uid=uid, host=ctx.hostname, nodes=nodes, environ=ctx.env.environ, store=ctx.store,
                          undo=undo_log(ctx.env), owner_alive=_owner_alive(ctx, alive), nodes_key=_nodes_key(user, jobid),
                          state_dir=node_state_dir(ctx.env), address=_address(ctx, node_plan))
            record["objects"] = jobnet.setup_node(node_plan, peers, common)
        # seconds waiting for the cluster's record and the other nodes, then making things
        record["timings"] = {"wait": round(waited - started, 3), "create": round(time.monotonic() - waited, 3)}
    except (PcoccError, OSError) as exc:
        reason = getattr(exc, "message", None) or f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": ")
        ctx.store.put(key, {**record, "state": "failed", "error": reason})
        raise PcoccError(f"node setup failed on {ctx.hostname}: {reason}") from None
    ctx.store.put(key, {**record, "state": "complete"})


def _plan(ctx, jobid, user, ranks, alive, multi_node):
    if not ctx.config.networks:  # no network anywhere: no need for the cluster's record
        return jobnet.NodePlan()
    info = jobnet.wait_info(ctx.store, user, jobid, alive)
    if ranks is None:
        if any(jobnet.vm_networks(ctx.config, vm["settings"]) for vm in info["vms"]):
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


def delete(ctx, jobid, uid):
    """Undo what create did for the job on this node (idempotent)."""
    user = _user(uid)
    with node_lock(ctx.env):
        # Our node record goes first: a node that gives back a shared id checks that no other
        # node of the job still has one, so the last node out always sees none.
        ctx.store.delete(_node_key(ctx, user, jobid))
        undo_log(ctx.env).replay(jobid, jobnet.undo_actions(ctx.env.environ, ctx.store))


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
    """Undo every job's setup on this node (after a crash or for maintenance)."""
    with node_lock(ctx.env):
        log_ = undo_log(ctx.env)
        actions = jobnet.undo_actions(ctx.env.environ, ctx.store)
        errors = []
        for job in log_.jobs():
            try:
                log_.replay(job, actions)
            except PcoccError as exc:
                errors.append(exc.message)
        if errors:
            raise PcoccError("; ".join(errors))


def undo_log(env):
    return UndoLog(node_state_dir(env))


def _nodes_key(user, jobid):
    return state.nodes_prefix(user, jobid)


def _reclaim_dead(ctx, jobid, alive):
    """Replay the logs of jobs that no longer run here (a setup killed before its delete)."""
    log_ = undo_log(ctx.env)
    for job in log_.jobs():
        if job != jobid and not alive(job):
            log.info("job %s is gone: undoing what its setup left on this node", job)
            try:
                log_.replay(job, jobnet.undo_actions(ctx.env.environ, ctx.store))
            except PcoccError as exc:  # its leftovers stay recorded; they only matter if in the way
                log.warning("%s", exc.message)


# SLURM job states after which nothing of the job runs any more
_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
          "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}


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
        return live[0] is None or str(owner).split(":")[0] in live[0]

    return alive
