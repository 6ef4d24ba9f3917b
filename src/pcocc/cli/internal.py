"""pcocc internal ...: what pcocc runs itself (SLURM tasks, the SPANK plugin)."""

import os
import sys

import click

from pcocc.cli.core import pass_app


@click.group(hidden=True)
def internal():
    """Commands run by pcocc itself (not for direct use)."""


@internal.command("run")
@click.option("-j", "--jobid", type=int, default=lambda: os.environ.get("SLURM_JOB_ID") or os.environ.get("PCOCC_JOB_ID"), help="Job id (default: $SLURM_JOB_ID).")
@click.option("-r", "--rank", type=int, default=lambda: os.environ.get("SLURM_PROCID"), help="Rank of the VM (default: $SLURM_PROCID).")
@pass_app
def run(app, jobid, rank):
    """Run one VM of a cluster until it stops (one SLURM task per VM)."""
    from pcocc.errors import UsageError
    from pcocc.lifecycle.vmrun import run_vm

    if jobid is None or rank is None:
        raise UsageError("need a job id and a VM rank (-j, -r, or SLURM's environment)")
    sys.exit(run_vm(app.ctx, int(jobid), int(rank)))


@internal.group()
def setup():
    """Privileged node setup, run as root by the SPANK plugin."""


@setup.command("create")
@click.option("-j", "--jobid", type=int, required=True)
@click.option("--uid", type=int, required=True, help="Uid of the job's owner.")
@click.option("--tasks-on-node", type=int, default=1)
@click.option("--ranks", default=lambda: os.environ.get("PCOCC_LOCAL_RANKS"),
              help="VM ranks on this node, comma-separated (default: $PCOCC_LOCAL_RANKS, set by the SPANK plugin).")
@click.option("--nodes", "step_nodes", default=lambda: os.environ.get("SLURM_STEP_NODELIST"),
              help="The step's nodes, in SLURM's syntax (default: $SLURM_STEP_NODELIST).")
@pass_app
def setup_create(app, jobid, uid, tasks_on_node, ranks, step_nodes):
    """Set this node up for a job."""
    from pcocc.lifecycle import nodesetup
    from pcocc.errors import UsageError
    from pcocc.networks.jobnet import expand_nodes

    try:
        rank_list = [int(r) for r in ranks.split(",") if r.strip()] if ranks is not None else None
    except ValueError:
        raise UsageError(f"--ranks: expected comma-separated numbers, got {ranks!r}") from None
    nodes = expand_nodes(step_nodes, app.ctx.env.environ) if step_nodes else None
    nodesetup.create(app.ctx, jobid, uid, tasks_on_node, rank_list, nodes, task_environ=nodesetup.task_environ(app.ctx.env.environ))


@setup.command("delete")
@click.option("-j", "--jobid", type=int, required=True)
@click.option("--uid", type=int, required=True, help="Uid of the job's owner.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds this may take; then it stops, and what is left stays in the undo log (named in the error).")
@click.option("--failed", "failure", default=None,
              help="The setup failed with this message: record the node failed, after the undo.")
@pass_app
def setup_delete(app, jobid, uid, deadline, failure):
    """Undo a job's setup on this node (the SPANK plugin runs it from the job's epilog)."""
    from pcocc.lifecycle import nodesetup

    nodesetup.delete(app.ctx, jobid, uid, deadline=deadline, failure=failure)


@setup.command("task-exit")
@click.option("-j", "--jobid", type=int, required=True)
@click.option("--uid", type=int, required=True, help="Uid of the job's owner.")
@click.option("--rank", type=int, required=True, help="The task's global id: the VM's rank.")
@click.option("--status", type=int, required=True, help="The task's wait status, as SLURM gives it.")
@pass_app
def setup_task_exit(app, jobid, uid, rank, status):
    """Mark a VM failed whose task ended without saying how (the SPANK plugin's task_exit hook)."""
    from pcocc.lifecycle import nodesetup

    nodesetup.task_exit(app.ctx, jobid, uid, rank, status)


@setup.command("init")
@pass_app
def setup_init(app):
    """Prepare this node (at boot)."""
    from pcocc.lifecycle import nodesetup

    nodesetup.init(app.ctx)


@setup.command("cleanup")
@pass_app
def setup_cleanup(app):
    """Undo every job's setup on this node."""
    from pcocc.lifecycle import nodesetup

    nodesetup.cleanup(app.ctx)


@internal.command("pkeyd")
@click.option("--once", is_flag=True, help="Write the partitions files once, signal OpenSM, and exit.")
@pass_app
def pkeyd(app, once):
    """Keep OpenSM's partitions in step with the PKeys of virtual clusters.

    Runs as root on the subnet manager's node (see contrib/systemd/pcocc-pkeyd.service):
    writes each infiniband network's opensm-partition-cfg from its opensm-partition-tpl
    and the PKeys in the store, then sends SIGHUP to opensm-daemon; again on each change.
    """
    import signal
    import threading

    from pcocc.networks import pkeyd as daemon

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    daemon.serve(app.ctx.store, app.config, app.env.environ, stop, once=once)


@internal.command("launcher")
@click.option("--definition", required=True)
@click.option("--name", default="pcocc")
@click.option("--user-data")
@click.option("--batch-script")
@click.option("--host-script")
@click.option("--interactive", is_flag=True)
@click.option("--restart-ckpt", help="Restore the VMs from this checkpoint directory.")
@click.option("--boot", is_flag=True, help="Boot the VMs even when their template has a snapshot.")
@click.option("--overrides", help="The cluster's --image and --mount, as JSON (pcocc.templates.apply_overrides).")
@pass_app
def launcher(app, definition, name, user_data, batch_script, host_script, interactive, restart_ckpt, boot, overrides):
    """The body of a SLURM job running a virtual cluster."""
    import json

    from pcocc.lifecycle.launcher import run_launcher

    sys.exit(run_launcher(app.ctx, definition, name, user_data, batch_script, host_script, interactive, info_out=app.info,
                          restart_dir=restart_ckpt, boot=boot, overrides=json.loads(overrides) if overrides else None))
