"""The alloc shell's and host commands' environment and prompt (issue 14; pcocc.lifecycle.allocshell)."""

import os
import shutil
import subprocess

import pytest

from pcocc.env import Environment
from pcocc.lifecycle import allocshell, launcher


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


def test_alloc_s_shell_is_started_with_the_prompt_and_the_cluster_s_environment(cli, tmp_path, monkeypatch):
    """Local alloc: the shell gets cluster_environ() and shell_command()'s argv; the rc file goes afterwards."""
    from fake_backend import install, local_site

    local_site(cli, tmp_path)
    cli.environ.update(SHELL=shutil.which("bash") or "/bin/bash", PCOCC_RUN_DIR=str(tmp_path / "run"))
    calls = []

    def call(argv, env, gone=None):
        calls.append((argv, env, open(argv[2]).read() if "--rcfile" in argv else None))
        return 0

    monkeypatch.setattr(launcher, "call_while_alive", call)
    with install():
        r = cli("alloc", "-m", "256", "tiny:2")
    assert r.status == 0, r.stderr
    ((argv, env, rc),) = calls
    assert argv[1] == "--rcfile" and "(pcocc/1) " in rc and "~/.bashrc" in rc and not os.path.exists(argv[2])
    assert (env["PCOCC_JOB_ID"], env["PCOCC_VMS"], env["PCOCC_VM_COUNT"], env["PCOCC_ALLOCATION"]) == ("1", "vm0 vm1", "2", "1")


def test_the_slurm_launcher_s_shell_gets_the_prompt(tmp_path, monkeypatch):

    env = _env(tmp_path)
    calls = []
    monkeypatch.setattr(launcher, "call_while_alive", lambda argv, environ, gone=None: calls.append((argv, environ, open(environ["ENV"]).read())) or 5)
    status = launcher.run_user_part(None, 12, dict(env.environ, SHELL="/bin/dash"), pcocc_env=env)
    assert status == 5
    ((argv, environ, rc),) = calls
    assert argv == ["/bin/dash"] and "(pcocc/12) " in rc
    assert not os.path.exists(environ["ENV"])  # removed once the shell ended


def test_a_batch_script_in_vm0_gets_the_cluster_in_its_environment(tmp_path):
    """The argv sent to the guest agent, run here by /bin/sh as the guest would: the variables, quoted."""
    from pcocc.agent.qga import run_script_argv
    from pcocc.batch.base import script_argv

    argv = script_argv(4, {"name": "it's $(a) job"}, [{"rank": 1, "name": "vm1"}, {"rank": 0, "name": "vm0"}],
                       run_script_argv(interpreter=None))
    script = b'#!/bin/sh\nprintf "%s|%s|%s|%s" "$PCOCC_JOB_ID" "$PCOCC_JOB_NAME" "$PCOCC_VMS" "$PCOCC_VM_COUNT"\n'
    r = subprocess.run(argv, input=script, capture_output=True, timeout=60, env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"4|it's $(a) job|vm0 vm1|2"
