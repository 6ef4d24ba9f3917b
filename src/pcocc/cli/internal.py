import click

from pcocc.cli.pending import pending_command


@click.group(hidden=True)
def internal():
    """Commands run by pcocc itself (not for direct use)."""


internal.add_command(pending_command("run", "Run one VM of a virtual cluster", "the single-host backend"))
internal.add_command(pending_command("setup", "Privileged node setup", "the SLURM backend"))
