"""pcocc internal ...: what pcocc runs itself (SLURM tasks, the SPANK plugin)."""

import os
import sys

import click

from pcocc.cli.core import pass_app
from pcocc.cli.pending import pending_command


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
    from pcocc.vmrun import run_vm

    if jobid is None or rank is None:
        raise UsageError("need a job id and a VM rank (-j, -r, or SLURM's environment)")
    sys.exit(run_vm(app.ctx, int(jobid), int(rank)))


internal.add_command(pending_command("setup", "Privileged node setup", "the SLURM backend"))
