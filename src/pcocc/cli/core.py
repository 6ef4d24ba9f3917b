"""Entry point and the one error boundary.

main() turns known errors into one line on stderr and an exit status (see
pcocc.errors.ExitStatus); program() is the plain command tree. Command
modules are imported only when their command runs, to keep start-up fast.
"""

import contextlib
import importlib
import logging
import sys

import click

from pcocc import __version__
from pcocc.env import Environment
from pcocc.errors import ExitStatus, PcoccError
from pcocc.names import one_line

# name -> (module under pcocc.cli, attribute, short help). Kept here so that
# `pcocc --help` lists every command without importing any of them.
COMMANDS = {
    "alloc": ("cluster", "alloc", "Run a virtual cluster, with an interactive shell in its allocation"),
    "batch": ("cluster", "batch", "Submit a virtual cluster as a batch job"),
    "ps": ("cluster", "ps", "List your running virtual clusters"),
    "cancel": ("cluster", "cancel", "Stop virtual clusters"),
    "history": ("cluster", "history", "List your ended virtual clusters (like sacct)"),
    "ssh": ("remote", "ssh", "Connect to a VM with ssh"),
    "scp": ("remote", "scp", "Copy files to and from VMs with scp"),
    "nc": ("remote", "nc", "Connect to a TCP port of a VM"),
    "ssh-config": ("remote", "ssh_config", "Print the ssh configuration naming the VMs (for ssh, rsync, ansible)"),
    "exec": ("access", "exec_", "Run a command in VMs through their agent"),
    "cp": ("copy", "cp", "Copy files and directories to and from VMs through their agent"),
    "shell": ("shell", "shell", "Open a shell in a VM through its agent (exec --pty)"),
    "console": ("access", "console", "Connect to the serial console of a VM"),
    "display": ("display", "display", "Show the graphical console of a VM (remote-viewer)"),
    "reset": ("access", "reset", "Reset VMs"),
    "monitor-cmd": ("access", "monitor_cmd", "Send a command to the qemu monitor of VMs"),
    "dump": ("access", "dump", "Dump the memory of a VM to a file"),
    "save": ("saving", "save", "Save the disk of a VM as a new image revision"),
    "ckpt": ("saving", "ckpt", "Checkpoint a virtual cluster to a directory"),
    "template": ("template", "template", "List and show VM templates"),
    "image": ("image", "image", "Manage VM images and repositories"),
    "config": ("config", "config", "Validate and show the configuration"),
    "help": ("helptopics", "help_", "Show a help topic"),
    "completion": ("completion", "command", "Print the shell completion script (bash, zsh)"),
    "internal": ("internal", "internal", "Commands run by pcocc itself"),
}
HIDDEN = {"internal"}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"pcocc.cli.{module}"), attr)

    def resolve_command(self, ctx, args):
        """click's, with a suggestion for a mistyped command (difflib): the lazy list is ours to search."""
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS and not ctx.resilient_parsing:
            import difflib

            visible = [n for n in COMMANDS if n not in HIDDEN]
            close = difflib.get_close_matches(name, visible, n=1)
            if close:
                ctx.fail(f"No such command {name!r}. Did you mean {close[0]!r}?")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx, formatter):
        rows = [(name, short) for name, (_, _, short) in COMMANDS.items() if name not in HIDDEN]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class App:
    """What every command gets: the environment, flags, and the config loaded once."""

    def __init__(self, env, verbosity=0, debug=False):
        from pcocc.context import Context

        self.env = env
        self.verbosity = verbosity
        self.debug = debug
        self.ctx = Context(env)

    @property
    def config(self):
        return self.ctx.config

    def out(self, text=""):
        self.env.stdout.write(text + "\n")

    def info(self, text):
        """A progress or status line for a person (stderr, hidden by -q)."""
        if self.verbosity >= 0:
            self.env.stderr.write(text + "\n")
            self.env.stderr.flush()

    def warn(self, text):
        if self.verbosity >= -1:
            self.env.stderr.write(f"pcocc: warning: {text}\n")
            self.env.stderr.flush()


pass_app = click.make_pass_decorator(App)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="pcocc")
@click.option("-v", "--verbose", count=True, help="More output (repeat for more).")
@click.option("-q", "--quiet", count=True, help="Less output.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def program(ctx, verbose, quiet, debug):
    """pcocc: run private virtual clusters of qemu VMs as ordinary cluster jobs.

    Run 'pcocc COMMAND --help' for the options of a command, and
    'pcocc help' for the help topics.
    """
    verbosity = verbose - quiet
    if ctx.obj is None:
        ctx.obj = App(Environment(), verbosity, debug)
    else:
        ctx.obj.verbosity, ctx.obj.debug = verbosity, debug
    level = logging.DEBUG if debug or verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    logging.basicConfig(level=level, format="pcocc: %(levelname)s: %(name)s: %(message)s", stream=ctx.obj.env.stderr)


def _debug_requested(argv):
    return "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv


def main(argv=None, env=None):
    """Run pcocc and exit with its status."""
    sys.exit(run(argv, env))


def run(argv=None, env=None):
    """Run pcocc and return its exit status (used by main and by the tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = env or Environment()
    if "_PCOCC_COMPLETE" in env.environ:  # the shell asks for candidates (cli/completion.py): nothing else runs
        from pcocc.cli.completion import complete

        return complete(program, env)
    debug = _debug_requested(argv)
    app = App(env, debug=debug)
    if any("\x00" in a for a in argv):  # execve cannot pass one; only a caller of run() can
        env.stderr.write("pcocc: error: an argument holds a NUL character\n")
        return ExitStatus.USAGE
    try:
        return _run(app, argv, env, debug)
    finally:
        _warn_ignored_templates(app, env)


def _warn_ignored_templates(app, env):
    """A command that worked while the template files are invalid says so (config.loader.BrokenTemplates)."""
    templates = getattr(app.ctx._config, "templates", None)
    if templates is None:  # no configuration loaded (--help): nor its loader, 30-60 ms of imports
        return
    from pcocc.config.loader import BrokenTemplates

    if isinstance(templates, BrokenTemplates) and not templates.used and app.verbosity >= -1:
        with contextlib.suppress(Exception):
            for text in [*templates.other_warnings, templates.warning()]:
                env.stderr.write(f"pcocc: warning: {text}\n")


def _run(app, argv, env, debug):
    try:
        # click prints help and version to sys.stdout: send it where env says.
        with contextlib.redirect_stdout(env.stdout):
            rv = program.main(argv, prog_name="pcocc", standalone_mode=False, obj=app)
        # non-standalone click returns what a command raised as click.exceptions.Exit(code)
        return rv if isinstance(rv, int) else ExitStatus.OK
    except click.ClickException as exc:  # usage errors: exit 2 with a hint
        # click lays out the choices of an option on lines of their own ("Choose from:\n\tbash,\n\tzsh"):
        # on one line here; any other control character (a user's value) stays escaped
        message = exc.format_message().replace(":\n\t", ": ").replace(",\n\t", ", ")
        env.stderr.write(f"pcocc: error: {one_line(message)}\n")
        if exc.ctx is not None and isinstance(exc, click.UsageError):
            env.stderr.write(f"Try '{exc.ctx.command_path} --help' for help.\n")
        return exc.exit_code
    except click.Abort:
        env.stderr.write("\npcocc: interrupted\n")
        return ExitStatus.INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        env.stderr.write("\npcocc: interrupted\n")
        return ExitStatus.INTERRUPTED
    except PcoccError as exc:
        if debug:
            import traceback

            traceback.print_exc(file=env.stderr)
        for line in exc.lines():  # user-given values in a message must not make lines of their own
            env.stderr.write(f"pcocc: error: {one_line(line)}\n")
        if exc.hint:  # what to do next, on a line of its own, as click's "Try ... --help"
            env.stderr.write(f"{one_line(exc.hint)}\n")
        return exc.status
    except BrokenPipeError:
        # The reader went away (pcocc ps | head): not an error of ours.
        sys.stderr = None
        return ExitStatus.OK
    except Exception as exc:  # a bug: say so, with the way to get details
        if debug:
            raise
        env.stderr.write(f"pcocc: internal error: {type(exc).__name__}: {one_line(exc)}\n")
        env.stderr.write("Run again with --debug for the traceback, and report it.\n")
        return ExitStatus.ERROR
