"""Review findings on alloc/batch, display and the alloc shell (issue 14), in-process: -r DIR with a
job name that is also a template's; the memory a restart asks for; alloc -E and batch -E take the
same scripts; --mount on a file; display of a restoring VM; the alloc shell's rc file."""

import json
import os
import shlex
import shutil
import subprocess

import pytest

from fake_backend import install, local_site
from pcocc.cli.cluster import _slurm_size, command_line, restart_options
from pcocc.errors import ExitStatus, UsageError


@pytest.fixture
def site(cli, tmp_path):
    local_site(cli, tmp_path)
    cli.environ["SHELL"] = "/bin/true"  # alloc's shell: ends at once
    with install() as backend:
        cli.backend = backend
        yield cli


def _one_line_error(r, status=ExitStatus.USAGE):
    assert r.status == status, (r.status, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("pcocc: error: ") and len(lines) <= 2 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _checkpoint(cli, tmp_path, vms=((2, 512),)):
    from pcocc.config.loader import load_config
    from pcocc.lifecycle import checkpoint

    settings = load_config(cli.env()).templates.resolve("tiny").values
    d = tmp_path / "ckpt"
    d.mkdir()
    manifest = {"format": checkpoint.FORMAT, "jobid": 5, "name": "pcocc", "definition": f"tiny:{len(vms)}",
                "vms": [{"rank": i, "template": "tiny", "settings_digest": checkpoint.settings_digest(settings), "vcpus": c,
                         "memory_mb": m} for i, (c, m) in enumerate(vms)]}
    (d / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return d


# ---- a. batch -r DIR -J NAME, NAME a template's name too


@pytest.mark.parametrize("extra, name", [(["-J", "tiny"], "tiny"), (["-J", "other"], "other"), (["--job-name", "tiny"], "tiny"),
                                         (["-J", "tiny", "tiny:1"], "tiny"), (["-Jtiny"], "tiny")])
def test_a_restart_s_job_name_may_be_a_template_s_name(site, tmp_path, extra, name):
    d = _checkpoint(site, tmp_path)
    r = site("batch", "-r", d, *extra)
    assert r.status == 0, r.stderr
    ((_, opts),) = site.backend.submitted
    assert (opts["name"], opts["definition"], opts["cpus"], opts["mem_per_core"]) == (name, "tiny:1", 2, 256)


def test_an_option_s_value_is_not_taken_for_the_definition(site):
    line = _one_line_error(site("batch", "-J", "tiny"))
    assert "missing the cluster DEFINITION" in line and site.backend.submitted == []


def test_a_slurm_restart_s_job_name_reaches_sbatch(cli, tmp_path, monkeypatch):
    from test_cli import _slurm_site

    recorded = _slurm_site(cli, tmp_path, monkeypatch)
    d = _checkpoint(cli, tmp_path)
    r = cli("batch", "-r", d, "-p", "tiny", "-J", "tiny")  # a partition and a job name that are template names
    assert r.status == 0, r.stderr
    got = recorded.read_text().splitlines()
    passed = got[:got.index("--wrap")]
    assert passed[passed.index("-p") + 1] == "tiny" and passed[passed.index("-J") + 1] == "tiny", passed
    launcher = shlex.split(got[got.index("--wrap") + 1])
    assert launcher[launcher.index("--definition") + 1] == "tiny:1"


# ---- b. the memory a restart asks for is the checkpoint's, exactly


def _manifest(vcpus, memory_mb):
    return {"definition": "tiny:1", "vms": [{"rank": 0, "vcpus": vcpus, "memory_mb": memory_mb}]}


def test_a_memory_that_is_not_whole_mib_per_core_is_asked_per_node_under_slurm():
    """1001 MiB on 2 cores (a --mem per node shared by its tasks): --mem-per-cpu=501 would give
    1002 MiB, which the VM's restart refuses; one VM per node with --mem=1001 gives it exactly."""
    assert restart_options([], _manifest(2, 1001), slurm=True) == ["-c", "2", "--ntasks-per-node=1", "--mem=1001"]
    assert restart_options(["--ntasks-per-node=2"], _manifest(2, 1001), slurm=True) == ["--ntasks-per-node=2", "-c", "2"]
    assert restart_options([], _manifest(2, 1002), slurm=True) == ["-c", "2", "--mem-per-cpu=501"]
    # one host takes MiB per core only: nothing is asked, and the restart check says what the VMs had
    assert restart_options([], _manifest(2, 1001), slurm=False) == ["-c", "2"]


def test_one_host_refuses_what_cannot_be_asked_before_anything_starts(site, tmp_path):
    d = _checkpoint(site, tmp_path, vms=((2, 1001),))
    line = _one_line_error(site("batch", "-r", d))
    assert "vm0 had 1001 MiB of memory when checkpointed" in line and site.backend.submitted == []


@pytest.mark.parametrize("opts, size", [
    ([], (1, None)), (["-c", "2", "--mem-per-cpu=256"], (2, 512)), (["-c2", "--mem-per-cpu", "1G"], (2, 2048)),
    (["--cpus-per-task=3", "--mem-per-cpu=100M"], (3, 300)), (["--mem-per-cpu=512K"], (1, None)),
    (["-c", "x"], (None, None)), (["-c", "2", "--mem-per-cpu=256", "--mem=4G"], (2, None)), (["--mem-per-cpu=0"], (1, None)),
])
def test_the_size_slurm_options_ask_for(opts, size):
    assert _slurm_size(opts) == size


def test_a_slurm_restart_with_other_memory_is_refused_before_submission(cli, tmp_path, monkeypatch):
    from test_cli import _slurm_site

    recorded = _slurm_site(cli, tmp_path, monkeypatch)
    d = _checkpoint(cli, tmp_path)
    line = _one_line_error(cli("batch", "-r", d, "--mem-per-cpu=100"))
    assert "vm0 had 512 MiB of memory when checkpointed, not 200" in line and not recorded.exists()
    assert cli("batch", "-r", d, "--mem-per-cpu=256").status == 0  # what the checkpoint had: accepted
    got = recorded.read_text().splitlines()
    assert "--mem-per-cpu=256" in got and got[got.index("-c") + 1] == "2"


# ---- c. alloc -E takes a script as batch -E does


def _script(tmp_path, body, mode=0o644):
    s = tmp_path / "my script.sh"
    s.write_text(body)
    s.chmod(mode)
    return s


def test_alloc_e_runs_a_script_without_the_x_bit_by_its_interpreter(site, tmp_path):
    got = tmp_path / "got"
    s = _script(tmp_path, f"#!/bin/sh -e\nprintf '%s|' \"$@\" > {got}\nexit 4\n")
    r = site("alloc", "-m", "256", "-E", f"{shlex.quote(str(s))} 'a b' c", "tiny:1")
    assert r.status == 4, r.stderr
    assert got.read_text() == "a b|c|"


def test_alloc_e_and_batch_e_refuse_the_same_script_alike(site, tmp_path):
    from pcocc.cli.cluster import script_command

    s = _script(tmp_path, "true\n")
    with pytest.raises(UsageError) as alloc_exc:
        command_line(shlex.quote(str(s)), "-E")
    with pytest.raises(UsageError) as batch_exc:
        script_command(str(s), "-E")
    assert alloc_exc.value.message == batch_exc.value.message == f"-E {s}: not executable and has no #! line (chmod +x it)"
    line = _one_line_error(site("alloc", "-E", shlex.quote(str(s)), "tiny:1"))
    assert "not executable and has no #! line" in line and site.backend.submitted == []


def test_alloc_e_s_command_line(tmp_path):
    s = _script(tmp_path, "#!/usr/bin/env python3\n")
    assert command_line(f"{shlex.quote(str(s))} x", "-E") == ["/usr/bin/env", "python3", str(s), "x"]
    s.chmod(0o755)
    assert command_line(f"{shlex.quote(str(s))} x", "-E") == [str(s), "x"]
    assert command_line("sh -c 'exit 0'", "-E") == ["sh", "-c", "exit 0"]


def test_alloc_e_says_where_a_script_named_without_a_path_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run-me.sh").write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match=r"command not found: run-me.sh \(the file here is ./run-me.sh\)"):
        command_line("run-me.sh", "-E")


def test_a_slurm_alloc_gives_the_launcher_the_script_s_interpreter(cli, tmp_path, monkeypatch):
    from test_cli import _slurm_site

    _slurm_site(cli, tmp_path, monkeypatch)
    s = _script(tmp_path, "#!/bin/sh\n")
    (tmp_path / "bin" / "salloc").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "salloc").chmod(0o755)

    class Execed(BaseException):  # past the CLI's error boundary, as an exec leaves it
        pass

    def execvp(path, argv):
        raise Execed(argv)

    monkeypatch.setattr(os, "execvp", execvp)
    with pytest.raises(Execed) as exc:
        cli("alloc", "-E", f"{shlex.quote(str(s))} 'a b'", "tiny:1")
    (argv,) = exc.value.args
    assert argv[0] == "salloc"
    host_script = argv[argv.index("--host-script") + 1]
    assert shlex.split(host_script) == ["/bin/sh", str(s), "a b"]


# ---- d. --mount on a file


def test_a_mount_path_that_is_a_file_is_not_a_directory(site, tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("x")
    line = _one_line_error(site("batch", "--mount", f"d={f}", "tiny:1"))
    assert line == f"pcocc: error: --mount d={f}: not a directory: {f}"
    line = _one_line_error(site("batch", "--mount", f"d={tmp_path}/nope,readonly=true", "tiny:1"))
    assert line == f"pcocc: error: --mount d={tmp_path}/nope,readonly=true: no such directory: {tmp_path}/nope"
    assert site.backend.submitted == []
    d = tmp_path / "50%{user}"
    d.mkdir()
    assert site("batch", "-m", "256", "--mount", f"d={d}", "tiny:1").status == 0  # kept literal, as typed


# ---- e. display of a VM that is restoring


@pytest.mark.parametrize("state, words", [
    ("restoring", "vm0 is restoring (from a checkpoint or a snapshot): its display is there once its qemu runs; try again"),
    ("starting", "vm0 is starting: its display is there once its qemu runs; try again"),
])
def test_display_of_a_vm_that_is_not_yet_up_says_to_try_again(cli, monkeypatch, state, words):
    from pcocc.cli import display as display_cli
    from test_display import cluster

    info, vms = cluster(state=state)
    vms[0].pop("display")  # published with its qemu ("qemu-start")
    monkeypatch.setattr(display_cli, "_cluster", lambda app, jobid, jobname, owner=None: (info, vms))
    r = cli("display", "-p")
    assert r.status == ExitStatus.ERROR and r.stderr.startswith(f"pcocc: error: {words}") and "older pcocc" not in r.stderr
    assert len(r.stderr.splitlines()) == 1


# ---- f. the alloc shell's rc file


def _env(tmp_path):
    from pcocc.env import Environment

    (tmp_path / "home").mkdir(exist_ok=True)
    return Environment(environ={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "PCOCC_RUN_DIR": str(tmp_path / "run")},
                       user="tester", home=str(tmp_path / "home"))


def test_the_rc_file_goes_in_the_cluster_s_run_dir_when_it_has_one(tmp_path):
    from pcocc.lifecycle import allocshell

    env = _env(tmp_path)
    jobdir = tmp_path / "job_3"
    jobdir.mkdir(mode=0o700)
    argv, shell_env, rcfile = allocshell.shell_command(env, 3, dict(env.environ, SHELL=shutil.which("bash")), str(jobdir))
    assert os.path.dirname(rcfile) == str(jobdir) and argv[1:] == ["--rcfile", rcfile]
    assert os.stat(rcfile).st_mode & 0o777 == 0o600
    argv, shell_env, rcfile = allocshell.shell_command(env, 3, dict(env.environ, SHELL="/bin/sh"), str(jobdir))
    assert shell_env["ENV"] == rcfile and os.path.dirname(rcfile) == str(jobdir)


def test_rc_files_of_processes_that_died_are_removed_by_the_next_one(tmp_path):
    from pcocc.lifecycle import allocshell
    from pcocc.procs import process_start

    env = _env(tmp_path)
    dead = subprocess.Popen(["true"])
    dead_start = process_start(dead.pid)
    dead.wait()
    shell_dir = tmp_path / "run" / "shell"
    shell_dir.mkdir(parents=True, mode=0o700)
    left = shell_dir / f"bashrc-9-{dead.pid}-{dead_start}"  # a killed alloc's
    left.write_text("x")
    mine = shell_dir / f"shrc-8-{os.getpid()}-{process_start(os.getpid())}"  # a live one's
    mine.write_text("x")
    other = shell_dir / "notes"
    other.write_text("x")
    _, _, rcfile = allocshell.shell_command(env, 10, dict(env.environ, SHELL="/bin/sh"))
    try:
        assert sorted(os.listdir(shell_dir)) == sorted([mine.name, other.name, os.path.basename(rcfile)])
    finally:
        allocshell.remove_rcfile(rcfile)


def test_a_local_alloc_s_rc_file_is_in_its_cluster_s_run_dir(cli, tmp_path, monkeypatch):
    from pcocc.lifecycle import launcher

    local_site(cli, tmp_path)
    cli.environ.update(SHELL="/bin/sh", PCOCC_RUN_DIR=str(tmp_path / "run"))
    jobdir = tmp_path / "job_1"
    jobdir.mkdir(mode=0o700)
    calls = []
    monkeypatch.setattr(launcher, "call_while_alive", lambda argv, env, gone=None: calls.append(env["ENV"]) or 0)
    with install() as backend:
        submit = backend.submit

        def with_rundir(vms, resolved, opts):
            jobid = submit(vms, resolved, opts)
            backend.clusters[jobid]["rundir"] = str(jobdir)
            return jobid

        backend.submit = with_rundir
        r = cli("alloc", "-m", "256", "tiny:1")
    assert r.status == 0, r.stderr
    (rcfile,) = calls
    assert os.path.dirname(rcfile) == str(jobdir) and not os.path.exists(rcfile)


@pytest.mark.parametrize("cmd", ["batch", "alloc"])
def test_an_option_after_the_definition_is_what_the_error_names(site, cmd):
    """'batch nosuch:1 --foo' used to blame nosuch:1 ("unexpected extra argument"): the option
    where the definition should be is named, with the usage, and nothing is submitted."""
    r = site(cmd, "tiny:1", "--foo")
    assert r.status == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "pcocc: error: the cluster DEFINITION comes last, after the options: got option '--foo' there"
    assert lines[1:] == [f"Usage: pcocc {cmd} [OPTIONS] DEFINITION (e.g. tiny:3)"] and site.backend.submitted == []


def test_a_word_after_the_definition_is_what_the_error_names(site):
    """'batch tiny:1 extra' blamed tiny:1 ('unexpected extra argument'); an option's value that
    is a template's name (-J tiny) is not taken for a definition."""
    r = site("batch", "tiny:1", "extra")
    assert r.status == 2 and r.stderr.splitlines()[0] == "pcocc: error: the cluster DEFINITION comes last: 'extra' after it is not one"
    assert site.backend.submitted == []
    r = site("batch", "-J", "tiny", "nosuch:2")
    assert "no template named 'nosuch'" in r.stderr and "comes last" not in r.stderr
