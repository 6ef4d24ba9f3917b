"""Commands whose implementation has not landed yet.

They exist so that the command tree is complete and `--help` works, and they
fail clearly (exit status NOT_AVAILABLE) instead of pretending to succeed.
"""

import click

from pcocc.errors import NotAvailableError


def pending_command(name, short, arrives_with):
    @click.command(
        name=name,
        help=f"{short}.\n\nNot available yet: arrives with {arrives_with}.",
        short_help=short,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args):
        raise NotAvailableError(f"'pcocc {name}' is not available yet: it arrives with {arrives_with}")

    return command
