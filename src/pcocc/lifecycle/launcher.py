"""`pcocc internal launcher`: the body of a SLURM job that runs a virtual cluster.

Runs inside the allocation (salloc's command, or sbatch's script): records the
cluster in the store, starts the VMs with srun, waits for them, then runs the
user's shell or script, and ends the cluster after it.
"""

import logging
import os
import signal
import subprocess
import sys
import time

from pcocc import state
from pcocc.batch.slurm import SlurmBackend, srun_vms
from pcocc.cluster import parse_definition
from pcocc.errors import PcoccError, PermissionDenied

log = logging.getLogger("pcocc.lifecycle.launcher")


def run_launcher(ctx, definition, name, user_data=None, batch_script=None, host_script=None, interactive=False, info_out=print,
                 restart_dir=None, boot=False):
    env = ctx.env.environ
    jobid = int(env["SLURM_JOB_ID"])
    backend = SlurmBackend(ctx)
    tset = ctx.config.templates
    vms = parse_definition(definition, tset)
    resolved = {n: tset.resolve(n) for n in {v.template for v in vms}}
    opts = {"name": name, "definition": definition, "user_data": user_data, "script": batch_script, "cwd": os.getcwd()}
    if restart_dir:  # `pcocc alloc|batch -r DIR` checked it; the files may have changed since
        from pcocc.lifecycle import checkpoint

        try:
            manifest = checkpoint.load(restart_dir)
            checkpoint.check_restart(manifest, restart_dir, vms, resolved)
        except PcoccError as exc:
            info_out(f"pcocc: error: {exc.message}")
            return 1
        opts["restart"] = {"dir": restart_dir, "manifest": manifest}
    elif not boot and not user_data:
        opts["instant"] = _instant(ctx, resolved, info_out)
    prefix = state.cluster_prefix(ctx.env.user, jobid)
    pcocc_bin = os.path.join(os.path.dirname(sys.executable), "pcocc")
    srun = None
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        if srun is not None and srun.poll() is None:
            srun.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        # The VMs' step first: its node setup (root) gives a first-time user an etcd account,
        # and the VMs wait for the cluster's record, written as soon as we may.
        srun = srun_vms(pcocc_bin, len(vms))
        start = time.monotonic()
        _wait_for_store_access(ctx, prefix, lambda: srun.poll() is None and not stopping)
        backend.write_credentials(jobid, [])
        ctx.store.put(prefix + "info", backend.cluster_info(jobid, vms, resolved, opts, backend="slurm", rundir=None, launcher_host=ctx.hostname))

        def progress(running, total):
            info_out(f"cluster {jobid}: {running}/{total} VMs running ({time.monotonic() - start:.1f} s)")

        backend.wait_ready(jobid, progress, alive=lambda jobid: srun.poll() is None and not stopping)
        ctx.store.update(prefix + "info", lambda i: {**i, "state": "running"})
        status = 0
        if host_script or interactive:
            child_env = dict(env, PCOCC_JOB_ID=str(jobid), PCOCC_JOB_NAME=name, PCOCC_ALLOCATION="1")
            argv = [host_script] if host_script else [env.get("SHELL") or "/bin/sh"]
            status = subprocess.call(argv, env=child_env)
        elif batch_script:
            status, out, err = backend.run_script_in_vm(jobid, batch_script)
            sys.stdout.buffer.write(out)
            sys.stderr.buffer.write(err)
            sys.stdout.flush()
        else:
            status = srun.wait()
        return status
    except PcoccError as exc:
        info_out(f"pcocc: error: {exc.message}")
        return 1
    finally:
        if srun is not None and srun.poll() is None:
            srun.send_signal(signal.SIGTERM)
            try:
                srun.wait(90)
            except subprocess.TimeoutExpired:
                srun.kill()
                srun.wait()
        ctx.store.delete_prefix(prefix)



def _instant(ctx, resolved, info_out):
    """{template: restore entry} of the templates whose snapshot can start their VMs (each VM checks its slice)."""
    from pcocc.lifecycle import instant

    out = {}
    images = ctx.images()
    for name, res in sorted(resolved.items()):
        entry, stale = instant.lookup(images, ctx.env, ctx.config, name, res, None, None)
        if entry:
            out[name] = entry
        elif stale:
            info_out(f"template {name}: its snapshot cannot be used ({stale}): its VMs boot")
    if out:
        info_out(f"restoring the VMs of {', '.join(out)} from their template's snapshot")
    return out or None


def _wait_for_store_access(ctx, prefix, alive, timeout=300):
    """Return once the store lets us in (a first job's account is made by its node setup)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctx.store.get(prefix + "info")
            return
        except PermissionDenied:
            if not alive() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
