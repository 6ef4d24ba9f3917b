import re

import pytest

from pcocc import __version__
from pcocc.cli.core import COMMANDS
from pcocc.errors import ExitStatus


def test_help_lists_every_command(cli):
    r = cli("--help")
    assert r.status == 0
    for name in ("alloc", "batch", "ps", "ssh", "scp", "nc", "exec", "console", "display", "save", "ckpt", "reset", "monitor-cmd", "dump", "template", "image", "config", "help"):
        assert re.search(rf"^\s+{re.escape(name)}\s", r.stdout, re.M), name
    assert "internal" not in r.stdout


def test_version(cli):
    r = cli("--version")
    assert r.status == 0 and __version__ in r.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(cli, name):
    r = cli(name, "--help")
    assert r.status == 0, r.stderr
    assert "Usage:" in r.stdout


def test_unknown_command_is_a_usage_error(cli):
    r = cli("frobnicate")
    assert r.status == ExitStatus.USAGE
    assert "Try 'pcocc --help'" in r.stderr


def test_bad_option_is_a_usage_error(cli):
    r = cli("template", "list", "--bogus")
    assert r.status == ExitStatus.USAGE
    assert "Try 'pcocc template list --help'" in r.stderr


def test_pending_commands_fail_clearly(cli):
    r = cli("display", "vm0")
    assert r.status == ExitStatus.NOT_AVAILABLE
    assert "not available yet" in r.stderr
    assert r.stdout == ""


def test_help_topics(cli):
    r = cli("help")
    assert r.status == 0 and "templates" in r.stdout
    r = cli("help", "exit-codes")
    assert r.status == 0 and "130" in r.stdout
    r = cli("help", "nope")
    assert r.status == ExitStatus.NOT_FOUND and "no help topic" in r.stderr


def test_error_boundary_hides_traceback_unless_debug(cli):
    cli.write("etc/templates.yaml", "a: [\n")
    r = cli("template", "list")
    assert r.status == ExitStatus.CONFIG
    assert "Traceback" not in r.stderr
    r = cli("--debug", "template", "list")
    assert "Traceback" in r.stderr
