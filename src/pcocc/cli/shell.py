"""pcocc shell [-s SHELL] [LOGIN@][vmN]: an interactive shell in a VM, the original pcocc's
command (pcocc-shell(1) there, through its own guest agent). Here it is `exec --pty` with a
login shell: through the standard qemu-guest-agent, with the guest requirements of --pty
(script(1) from util-linux or busybox: docs/exec.md)."""

import re
import shlex

import click

from pcocc.cli import params
from pcocc.cli.access import exec_, job_options
from pcocc.cli.core import pass_app
from pcocc.errors import UsageError
from pcocc.names import shown

# [LOGIN@]vmN, as the original's synopsis writes the target
_TARGET = re.compile(r"(?:(?P<login>[^@]+)@)?(?P<vm>vm[0-9]+)")

# The login shell of the user the command runs as, from /etc/passwd (getent is missing from
# some minimal images; awk is in busybox), /bin/sh when it names none.
_LOGIN_SHELL = ('s=$(awk -F: -v u="$(id -u)" \'$3 == u { print $7; exit }\' /etc/passwd 2>/dev/null); '
                'exec "${s:-/bin/sh}" -l')


def shell_command(shell=None):
    """The guest command line of `pcocc shell`: SHELL (a name found in the guest's PATH, or a
    path) as a login shell, else the user's own login shell from the guest's /etc/passwd."""
    return _LOGIN_SHELL if not shell else f"exec {shlex.quote(shell)} -l"


@click.command("shell")
@job_options
@click.option("-s", "--shell", "shell", metavar="SHELL", help="Shell to run (sh, bash, zsh..., installed in the VM); default: the user's login shell there.")
@click.argument("target", required=False, default="vm0", metavar="[LOGIN@][vmN]")
@click.pass_context
@pass_app
def shell(app, ctx, jobid, jobname, shell, target):
    """Open a shell in a VM (default vm0, as root), on a terminal, through its guest agent.

    The original pcocc's 'shell': 'pcocc shell user1@vm4', 'pcocc shell -s zsh vm3'. It is
    'pcocc exec --pty' running a login shell; exit it (or Ctrl-D) to come back. stdin must
    be a terminal.
    """
    m = _TARGET.fullmatch(target or "")
    if not m:
        raise UsageError(f"invalid target {shown(target)}: write [LOGIN@]vmN, e.g. vm0 or user1@vm4")
    login = m.group("login")
    if login is not None:
        login = params.USER_NAME.convert(login, None, ctx)  # the same rule as exec -u
    if shell is not None and (not shell or "\0" in shell or "\n" in shell):
        raise UsageError("-s SHELL: a shell name or path, on one line")
    ctx.invoke(exec_, jobid=jobid, jobname=jobname, vmset=m.group("vm"), user=login, pty=True, cmd=(shell_command(shell),))
