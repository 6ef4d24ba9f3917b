"""The alloc shell's and host commands' environment and prompt (issue 14; pcocc.lifecycle.allocshell)."""

import os
import shutil
import subprocess

import pytest

from pcocc.env import Environment
from pcocc.lifecycle import allocshell


def _env(tmp_path):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environ = {"HOME": str(home), "PATH": os.environ["PATH"], "PCOCC_RUN_DIR": str(tmp_path / "run")}
    return Environment(environ=environ, user="tester", home=str(home))


def _info(address="10.0.0.1"):
    objects = {"address": address, "vm_port": 22, "vms": {"0": {"host_port": 40022}, "1": {"host_port": 40023}}}
    return {"jobid": 9, "created": 1.5, "nodes": {"n1": {"objects": {"eth": objects}}}}


VMS = [{"rank": 1, "name": "vm1", "host": "n1"}, {"rank": 0, "name": "vm0", "host": "n1"}]


def test_the_environment_names_the_cluster_its_vms_and_its_ssh_config(tmp_path):
    env = _env(tmp_path)
    out = allocshell.cluster_environ(env, 9, "job", _info(), VMS)
    assert {k: out[k] for k in ("PCOCC_JOB_ID", "PCOCC_JOB_NAME", "PCOCC_ALLOCATION", "PCOCC_VMS", "PCOCC_VM_COUNT")} == {
        "PCOCC_JOB_ID": "9", "PCOCC_JOB_NAME": "job", "PCOCC_ALLOCATION": "1", "PCOCC_VMS": "vm0 vm1", "PCOCC_VM_COUNT": "2"}
    config = open(out["PCOCC_SSH_CONFIG"]).read()  # the very file 'pcocc ssh' uses
    assert "Host vm0\n  HostName 10.0.0.1\n  Port 40022" in config and "Host vm1" in config
    assert os.stat(os.path.dirname(out["PCOCC_SSH_CONFIG"])).st_mode & 0o077 == 0  # in a private directory


def test_no_ssh_config_without_a_reverse_nat(tmp_path):
    out = allocshell.cluster_environ(_env(tmp_path), 9, "job", {"jobid": 9, "nodes": {}}, VMS)
    assert "PCOCC_SSH_CONFIG" not in out and out["PCOCC_VM_COUNT"] == "2"
    assert not os.path.exists(tmp_path / "run" / "ssh") or os.listdir(tmp_path / "run" / "ssh") == []  # no file left
    assert allocshell.cluster_environ(_env(tmp_path), 9, "job") == {"PCOCC_JOB_ID": "9", "PCOCC_JOB_NAME": "job", "PCOCC_ALLOCATION": "1"}


def _interactive(argv, environ, command):
    """What an interactive shell started as argv prints for command (-i -c: rc files read, no terminal needed)."""
    r = subprocess.run([*argv, "-i", "-c", command], env=environ, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    return r.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is part of every Debian")
def test_bash_gets_the_prompt_after_the_users_bashrc_which_stays_as_it_was(tmp_path):
    env = _env(tmp_path)
    bashrc = tmp_path / "home" / ".bashrc"
    bashrc.write_text('PS1="me> "\nMINE=yes\nPROMPT_COMMAND=\n')
    before = bashrc.read_bytes()
    environ = dict(env.environ, SHELL=shutil.which("bash"), PCOCC_JOB_ID="7")
    argv, shell_env, rcfile = allocshell.shell_command(env, 7, environ)
    try:
        out = _interactive(argv, shell_env, 'printf "[%s][%s]" "$PS1" "$MINE"')
        assert out == "[(pcocc/7) me> ][yes]", out
    finally:
        allocshell.remove_rcfile(rcfile)
    assert bashrc.read_bytes() == before and not os.path.exists(rcfile)


@pytest.mark.parametrize("shell", ["dash", "sh"])
def test_a_posix_shell_gets_the_prompt_after_the_users_env_file(tmp_path, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell} here")
    env = _env(tmp_path)
    user_env = tmp_path / "home" / ".shrc"
    user_env.write_text('PS1="me$ "\nMINE=yes\n')
    environ = dict(env.environ, SHELL=shutil.which(shell), ENV=str(user_env))
    argv, shell_env, rcfile = allocshell.shell_command(env, 8, environ)
    try:
        out = _interactive(argv, shell_env, 'printf "[%s][%s]" "$PS1" "$MINE"')
        assert out == "[(pcocc/8) me$ ][yes]", out
    finally:
        allocshell.remove_rcfile(rcfile)
    assert shell_env["PCOCC_USER_ENV"] == str(user_env)


def test_another_shell_gets_the_original_s_prompt_command(tmp_path):
    env = _env(tmp_path)
    argv, shell_env, rcfile = allocshell.shell_command(env, 5, dict(env.environ, SHELL="/usr/bin/zsh"))
    assert argv == ["/usr/bin/zsh"] and rcfile is None
    assert shell_env["PROMPT_COMMAND"] == 'echo -n "(pcocc/5) "'
