"""pcocc shell (the original's command): its target and options are checked before anything runs,
and its guest command line is a login shell (the terminal part: tests/integration/test_pty.py)."""

import shlex

import pytest

from pcocc.cli.shell import shell_command


@pytest.mark.parametrize("target", ["vm", "node1", "a@b@vm1", "@vm0", "vm0 ", "vm1\nvm2", "all"])
def test_a_target_that_is_not_login_at_vmN_is_a_usage_error(cli, target):
    r = cli("shell", target)
    assert r.status == 2 and r.stderr.startswith("pcocc: error: invalid target "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""


def test_a_login_follows_exec_s_user_name_rule(cli):
    r = cli("shell", "--", "-rf@vm0")
    assert r.status == 2 and "invalid user name" in r.stderr, r.stderr


def test_the_guest_command_is_a_login_shell():
    assert shell_command("zsh") == "exec zsh -l"
    assert shlex.split(shell_command("my shell; rm -rf /")) == ["exec", "my shell; rm -rf /", "-l"]  # one word, quoted
    default = shell_command()
    assert "/etc/passwd" in default and default.endswith('exec "${s:-/bin/sh}" -l')


def test_click_s_own_errors_stay_on_one_line(cli):
    """A missing choice argument: click lays the choices out on lines of their own; one line here."""
    r = cli("completion")
    assert r.status == 2 and r.stderr.splitlines()[0] == "pcocc: error: Missing argument '{bash|zsh}'. Choose from: bash, zsh", r.stderr
