"""`pcocc internal setup init|create|delete|cleanup`: the privileged part of a job on a node.

Run as root by the SPANK plugin (create when a job's first --vm step starts on
the node, delete when it ends), under a node-wide lock. The node publishes its
state in the store (network-config -> complete, or failed with the reason)
where the launcher waits for it. Networks (their host objects and the undo
log that removes them) plug in here.
"""

import contextlib
import fcntl
import logging
import os
import pwd

from pcocc import state
from pcocc.errors import PcoccError, UsageError

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
    return state.cluster_prefix(user, jobid) + f"nodes/{ctx.hostname}"


def create(ctx, jobid, uid, tasks):
    """Set this node up for the job; publish complete, or failed with the reason."""
    user = _user(uid)
    key = _node_key(ctx, user, jobid)
    if ctx.config.batch.settings["etcd-auth-type"] == "password" and ctx.config.batch.store == "etcd":
        from pcocc.store.etcdauth import ensure_user

        ensure_user(ctx.store, user)  # the user's first job: its etcd account and role
    ctx.store.put(key, {"state": "network-config", "tasks": tasks})
    try:
        with node_lock(ctx.env):
            pass  # the job's networks are created here, each recorded in the undo log first
    except (PcoccError, OSError) as exc:
        reason = getattr(exc, "message", None) or f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": ")
        ctx.store.put(key, {"state": "failed", "error": reason, "tasks": tasks})
        raise PcoccError(f"node setup failed on {ctx.hostname}: {reason}") from None
    ctx.store.put(key, {"state": "complete", "tasks": tasks})


def delete(ctx, jobid, uid):
    """Undo what create did for the job on this node (idempotent)."""
    user = _user(uid)
    with node_lock(ctx.env):
        ctx.store.delete(_node_key(ctx, user, jobid))


def init(ctx):
    with node_lock(ctx.env):
        os.makedirs(node_state_dir(ctx.env), mode=0o755, exist_ok=True)


def cleanup(ctx):
    """Undo every job's setup on this node (after a crash or for maintenance)."""
    with node_lock(ctx.env):
        pass  # nothing is recorded on the node yet: networks bring the undo log
