"""alloc/batch --image, --mount and -E as the original pcocc takes them (issue 13), in-process.

The VMs' side (the image booted, the share mounted) is in tests/integration/test_alloc_image_mount.py.
"""

import json
import os
import shlex

import pytest

from fake_backend import install, local_site
from pcocc import pathtpl, templates
from pcocc.errors import ExitStatus, UsageError
from pcocc.templates import Resolved


# ---- --image [TPL=]IMAGE

def test_a_bare_image_is_for_the_only_template():
    assert templates.parse_image_options(["r:other"], ["tiny", "tiny"]) == {"tiny": "r:other"}
    assert templates.parse_image_options(["tiny=r:other@2", "big=x"], ["tiny", "big"]) == {"tiny": "r:other@2", "big": "x"}
    assert templates.parse_image_options([], ["tiny"]) == {}


def test_a_bare_image_with_several_templates_is_refused_naming_them():
    with pytest.raises(UsageError) as exc:
        templates.parse_image_options(["r:other"], ["tiny", "big", "tiny"])
    assert "several templates (tiny, big)" in exc.value.message and "TEMPLATE=IMAGE" in exc.value.message


def test_a_template_not_in_the_definition_is_refused_by_name():
    with pytest.raises(UsageError) as exc:
        templates.parse_image_options(["nope=r:other"], ["tiny"])
    assert "template 'nope' is not in the cluster definition (tiny)" in exc.value.message


@pytest.mark.parametrize("values, words", [(["tiny=a", "tiny=b"], "two images"), (["tiny=r:bad/name"], "invalid image name"),
                                           (["tiny="], "invalid image name")])
def test_bad_image_options_are_refused(values, words):
    with pytest.raises(UsageError) as exc:
        templates.parse_image_options(values, ["tiny"])
    assert words in exc.value.message


# ---- --mount TAG=PATH[,type=virtio-9p|virtio-fs][,readonly=true|false]

def test_a_mount_takes_the_templates_defaults(tmp_path):
    assert templates.parse_mount_option(f"data={tmp_path}", "/") == ("data", {"path": str(tmp_path), "type": "virtio-9p", "readonly": False})


def test_a_mount_s_options_in_any_order_and_a_relative_path(tmp_path):
    tag, m = templates.parse_mount_option("d=sub/dir,readonly=TRUE,type=virtio-fs", str(tmp_path))
    assert (tag, m) == ("d", {"path": f"{tmp_path}/sub/dir", "type": "virtio-fs", "readonly": True})
    assert templates.parse_mount_option("d=/x,type=virtio-9p,readonly=false", "/")[1] == {"path": "/x", "type": "virtio-9p", "readonly": False}


def test_a_mount_path_may_hold_commas_and_percent_signs_kept_literal():
    _, m = templates.parse_mount_option("d=/data/a,b/50%off/%{user},readonly=true", "/")
    assert m["readonly"] is True
    # the VM expands mount paths (pcocc.pathtpl): a typed path comes back as typed
    assert pathtpl.expand(m["path"], {"user": "someone"}, {}) == "/data/a,b/50%off/%{user}"


@pytest.mark.parametrize("value, words", [
    ("/data", "expected TAG=PATH"), ("=/data", "invalid tag ''"), ("a b=/data", "invalid tag 'a b'"), ("t" * 32 + "=/d", "invalid tag"),
    ("d=", "no PATH"), ("d=,readonly=true", "no PATH"), ("d=/x,rw=true", "unknown option 'rw'"),
    ("d=/x,readonly=yes", "readonly must be true or false"), ("d=/x,type=nfs", "type must be virtio-9p or virtio-fs"),
    ("d=/x,readonly=true,readonly=false", "'readonly' given twice"),
])
def test_bad_mounts_are_refused(value, words):
    with pytest.raises(UsageError) as exc:
        templates.parse_mount_option(value, "/")
    assert words in exc.value.message and "\n" not in exc.value.message


def test_a_mount_tag_given_twice_is_refused():
    with pytest.raises(UsageError, match="tag 'd' given twice"):
        templates.parse_mount_options(["d=/a", "d=/b"], "/")


def test_overrides_change_the_resolved_templates_only_where_asked():
    base = {"image": "r:tiny", "mount-points": {"home": {"path": "/h", "type": "virtio-9p", "readonly": False},
                                                "keep": {"path": "/k", "type": "virtio-9p", "readonly": True}}}
    resolved = {"tiny": Resolved("tiny", "user", dict(base), {}), "big": Resolved("big", "user", dict(base), {})}
    new = {"path": "/n", "type": "virtio-fs", "readonly": True}
    out = templates.apply_overrides(resolved, {"images": {"tiny": "r:other"}, "mounts": {"home": new}})
    assert out["tiny"]["image"] == "r:other" and out["big"]["image"] == "r:tiny"
    for name in ("tiny", "big"):
        assert out[name]["mount-points"] == {"home": new, "keep": base["mount-points"]["keep"]}
    assert resolved["tiny"]["image"] == "r:tiny" and resolved["tiny"]["mount-points"]["home"]["path"] == "/h"  # untouched
    assert templates.apply_overrides(resolved, None) is resolved


# ---- through the CLI (local backend, a fake that records what is submitted)

@pytest.fixture
def site(cli, tmp_path):
    local_site(cli, tmp_path)
    cli.environ["SHELL"] = "/bin/true"  # alloc's shell: ends at once, writes no rc file
    with install() as backend:
        seen = []
        submit = backend.submit

        def recording(vms, resolved, opts):
            seen.append(resolved)
            return submit(vms, resolved, opts)

        backend.submit = recording
        backend.resolved = seen
        cli.backend = backend
        yield cli


def _one_line_error(r, status=ExitStatus.USAGE):
    assert r.status == status, (r.status, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[0].startswith("pcocc: error: ") and len(lines) <= 2 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("cmd", ["batch", "alloc"])
def test_image_boots_the_vms_of_its_template_from_another_image(site, cmd):
    r = site(cmd, "-m", "256", "--image", "other=r:img@3", "tiny:1,other:2")
    assert r.status == 0, r.stderr
    ((_, opts),) = site.backend.submitted
    (resolved,) = site.backend.resolved
    assert resolved["other"]["image"] == "r:img@3" and resolved["tiny"]["image"] == "r:tiny"
    assert opts["overrides"] == {"images": {"other": "r:img@3"}}


@pytest.mark.parametrize("argv, words", [
    (["--image", "r:img", "tiny:1,other:1"], "several templates (tiny, other)"),
    (["--image", "big=r:img", "tiny:1"], "template 'big' is not in the cluster definition (tiny)"),
    (["--mount", "d=/no/such/dir", "tiny:1"], "no such directory: /no/such/dir"),
    (["--mount", "d=/tmp,ro=1", "tiny:1"], "unknown option 'ro'"),
])
def test_bad_image_or_mount_options_are_refused_before_anything_starts(site, argv, words):
    line = _one_line_error(site("batch", *argv))
    assert words in line
    assert site.backend.submitted == []


def test_mount_shares_a_directory_with_every_vm(site, tmp_path):
    r = site("batch", "--mount", f"data={tmp_path},readonly=true", "--mount", "scratch=.", "tiny:1,other:1")
    assert r.status == 0, r.stderr
    (resolved,) = site.backend.resolved
    for name in ("tiny", "other"):
        assert resolved[name]["mount-points"] == {
            "data": {"path": str(tmp_path), "type": "virtio-9p", "readonly": True},
            "scratch": {"path": os.getcwd(), "type": "virtio-9p", "readonly": False}}


def test_image_and_mount_reach_sbatch_s_launcher_not_sbatch(cli, tmp_path, monkeypatch):
    from test_cli import _slurm_site

    recorded = _slurm_site(cli, tmp_path, monkeypatch)
    r = cli("batch", "-pbatch", "--image", "r:other@2", "--mount", f"d={tmp_path},type=virtio-fs", "tiny:2")
    assert r.status == 0, r.stderr
    got = recorded.read_text().splitlines()
    wrap = got.index("--wrap")
    assert "-pbatch" in got[:wrap] and not any("--image" in a or "--mount" in a for a in got[:wrap])
    launcher = shlex.split(got[wrap + 1])
    overrides = json.loads(launcher[launcher.index("--overrides") + 1])
    assert overrides == {"images": {"tiny": "r:other@2"}, "mounts": {"d": {"path": str(tmp_path), "type": "virtio-fs", "readonly": False}}}


def test_alloc_on_slurm_gives_the_launcher_the_image_and_the_command_line(cli, tmp_path, monkeypatch):
    from test_cli import _slurm_site

    _slurm_site(cli, tmp_path, monkeypatch)
    salloc = tmp_path / "bin" / "salloc"
    salloc.write_text("#!/bin/sh\nexit 0\n")
    salloc.chmod(0o755)
    execs = []

    def fake_exec(path, argv):
        import click

        execs.append(argv)
        raise click.exceptions.Exit(0)  # as salloc's end would

    monkeypatch.setattr(os, "execvp", fake_exec)
    r = cli("alloc", "--image", "tiny=r:other", "-E", "sh -c 'exit 0'", "tiny:1")
    assert r.status == 0, r.stderr
    (argv,) = execs
    assert argv[0] == "salloc" and "--image" not in argv[:argv.index("internal")]
    assert argv[argv.index("--host-script") + 1] == "sh -c 'exit 0'"
    assert json.loads(argv[argv.index("--overrides") + 1]) == {"images": {"tiny": "r:other"}}


def test_the_templates_snapshot_is_not_used_for_another_image(site, monkeypatch):
    import pcocc.cli.cluster as cluster_cli
    from pcocc.lifecycle import instant

    monkeypatch.setattr(cluster_cli, "_instant", _REAL_INSTANT)  # the fake backend turns it off
    monkeypatch.setattr(instant, "lookup", lambda images, env, config, name, res, *a: ({"dir": f"/snap/{name}", "vm": {}}, None))
    r = site("batch", "tiny:1,other:1")
    assert r.status == 0, r.stderr
    assert set(site.backend.submitted[-1][1]["instant"]) == {"tiny", "other"}  # the lookup above is used
    r = site("batch", "--image", "other=r:img", "tiny:1,other:1")
    assert r.status == 0, r.stderr
    assert set(site.backend.submitted[-1][1]["instant"]) == {"tiny"}
    assert "template other: its snapshot is not used: its VMs boot from r:img (--image)" in r.stderr
    r = site("batch", "--mount", "d=/tmp", "tiny:1,other:1")
    assert r.status == 0, r.stderr
    assert site.backend.submitted[-1][1]["instant"] is None and "own mount points (--mount)" in r.stderr


import pcocc.cli.cluster as _cluster_cli  # noqa: E402

_REAL_INSTANT = _cluster_cli._instant


def test_a_cluster_started_with_image_cannot_be_saved(site):
    site.backend.submit([type("V", (), {"rank": 0})()], {}, {"name": "pcocc", "definition": "tiny:1"})
    site.backend.clusters[1]["overrides"] = {"images": {"tiny": "r:other"}}
    line = _one_line_error(site("save", "-j", "1"), ExitStatus.ERROR)
    assert "cluster 1 was started with --image (tiny=r:other): its disks cannot be saved" in line
    from pcocc.cli.saving import check_saveable

    check_saveable({"jobid": 2, "overrides": {"mounts": {"d": {}}}})  # mounts alone do not stop a save
    check_saveable({"jobid": 3})


# ---- a restart keeps the checkpoint's images

def _checkpoint(tmp_path, settings, overrides):
    from pcocc.lifecycle import checkpoint

    d = tmp_path / "ckpt"
    d.mkdir()
    manifest = {"format": checkpoint.FORMAT, "jobid": 5, "name": "pcocc", "definition": "tiny:1",
                "vms": [{"rank": 0, "template": "tiny", "settings_digest": checkpoint.settings_digest(settings),
                         "vcpus": 1, "memory_mb": 256}]}
    if overrides:
        manifest["overrides"] = overrides
    (d / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return d


def test_a_restart_takes_the_checkpoint_s_images_whatever_is_given(site, tmp_path):
    tset = _config(site).templates
    overrides = {"images": {"tiny": "r:other@4"}}
    settings = templates.apply_overrides({"tiny": tset.resolve("tiny")}, overrides)["tiny"].values
    d = _checkpoint(tmp_path, settings, overrides)
    r = site("batch", "-m", "256", "-r", d, "tiny:1")
    assert r.status == 0, r.stderr
    assert site.backend.resolved[-1]["tiny"]["image"] == "r:other@4"
    assert site.backend.submitted[-1][1]["overrides"] == overrides
    r = site("batch", "-m", "256", "-r", d, "--image", "r:third", "tiny:1")
    assert r.status == 0, r.stderr
    assert site.backend.resolved[-1]["tiny"]["image"] == "r:other@4"
    assert "a restart keeps the images of checkpoint" in r.stderr and "--image is ignored" in r.stderr
    line = _one_line_error(site("batch", "-m", "256", "-r", d, "--mount", "x=/tmp", "tiny:1"))
    assert "--mount cannot be used with -r" in line


def _config(cli):
    from pcocc.config.loader import load_config

    env = cli.env()
    return load_config(env)


# ---- alloc -E takes a command line (split as a shell does); batch -b and -E both run

def test_alloc_e_runs_a_command_line_with_its_arguments(site, tmp_path):
    script = tmp_path / "args.sh"
    script.write_text(f"#!/bin/sh\nprintf '%s|' \"$@\" > {tmp_path}/got\necho \"$PCOCC_JOB_ID\" >> {tmp_path}/got\nexit 3\n")
    script.chmod(0o755)
    r = site("alloc", "-m", "256", "-E", f"{script} 'a b' c", "tiny:1")
    assert r.status == 3, r.stderr
    assert (tmp_path / "got").read_text() == "a b|c|1\n"
    assert site.backend.cancelled == [1]


@pytest.mark.parametrize("command, words", [("no-such-command-x --flag", "command not found: no-such-command-x"),
                                            ("'unbalanced", "No closing quotation"), ("  ", "an empty command"),
                                            ("/no/such/file arg", "no such file: /no/such/file")])
def test_alloc_e_refuses_a_command_that_cannot_run_before_anything_starts(site, command, words):
    line = _one_line_error(site("alloc", "-E", command, "tiny:1"))
    assert words in line
    assert site.backend.submitted == []


def test_alloc_e_finds_a_command_in_path(site):
    r = site("alloc", "-m", "256", "-E", "sh -c 'exit 0'", "tiny:1")
    assert r.status == 0, r.stderr


def test_batch_e_runs_a_script_without_the_x_bit_by_its_interpreter(tmp_path):
    from pcocc.cli.cluster import script_command

    s = tmp_path / "my script.sh"
    s.write_text("#!/bin/sh -e\ntrue\n")
    s.chmod(0o644)
    assert shlex.split(script_command(str(s), "-E")) == ["/bin/sh", "-e", str(s)]
    s.chmod(0o755)
    assert shlex.split(script_command(str(s), "-E")) == [str(s)]
    s.write_text("true\n")
    s.chmod(0o644)
    with pytest.raises(UsageError, match="not executable and has no #! line"):
        script_command(str(s), "-E")


class _VmScript:
    """A stand-in for the backend's run_script_in_vm: waits until the host command has started
    (its pid written to a file), then returns as a script in vm0 would."""

    def __init__(self, pidfile, status):
        self.pidfile, self.status, self.ran = pidfile, status, []

    def run_script_in_vm(self, jobid, script):
        import time

        deadline = time.monotonic() + 120  # a bound for a loaded host, not a timing assertion
        while not (self.pidfile.exists() and self.pidfile.read_text().endswith("\n")):
            assert time.monotonic() < deadline, "the host command never started"
            time.sleep(0.05)
        self.ran.append((jobid, script))
        return self.status, b"out of vm0\n", b""


def test_batch_b_and_e_run_both_and_the_cluster_ends_with_b(tmp_path):
    """The original's launcher: -b in vm0 and -E on the host at once; -b's end ends the cluster."""
    import io

    from pcocc.lifecycle.launcher import run_user_part

    pidfile = tmp_path / "host.pid"
    host = tmp_path / "host.sh"
    host.write_text(f"#!/bin/sh\necho \"$PCOCC_JOB_ID $$\" > {pidfile}\nexec sleep 1000\n")
    host.chmod(0o755)
    backend = _VmScript(pidfile, 7)
    out = io.BytesIO()
    env = dict(os.environ, PCOCC_JOB_ID="42")
    status = run_user_part(backend, 42, env, batch_script="/x/b.sh", host_script=shlex.quote(str(host)), out=out, err=io.BytesIO())
    assert status == 7 and backend.ran == [(42, "/x/b.sh")] and out.getvalue() == b"out of vm0\n"
    jobid, pid = pidfile.read_text().split()
    assert jobid == "42"
    with pytest.raises(ProcessLookupError):  # stopped and reaped when the batch script ended
        os.kill(int(pid), 0)


def test_a_host_command_alone_gives_its_status(tmp_path):
    from pcocc.lifecycle.launcher import run_user_part

    assert run_user_part(None, 1, dict(os.environ), host_script="sh -c 'exit 4'") == 4


def test_the_local_supervisor_reaps_only_its_vm_processes():
    """A batch -E host command is the supervisor's child too: its status is its runner's, not the VM reaper's."""
    import subprocess

    from pcocc.batch.local import _reap

    other = subprocess.Popen(["sh", "-c", "exit 3"])  # the older child: a waitpid(-1) takes it first
    vm = subprocess.Popen(["true"])
    for p in (vm, other):  # both ended (not reaped): a reaper of any child would take both
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    children = {vm.pid: 0}
    while children:
        ended = _reap(children)
    assert [pid for pid, _ in ended] == [vm.pid]
    assert other.wait() == 3  # still ours to wait for, with its own status


def test_a_reclaim_kills_the_host_command_of_a_dead_supervisor():
    """batch -E on one host: the command's process group is recorded; a reclaim (its supervisor died) kills it."""
    import subprocess

    from pcocc.batch.local import _kill_host_command
    from pcocc.procs import process_start

    proc = subprocess.Popen(["sh", "-c", "sleep 1000 & wait"], start_new_session=True)
    info = {"host_command": proc.pid, "host_command_start": process_start(proc.pid)}
    _kill_host_command({"host_command": proc.pid, "host_command_start": "not its start"})  # another process: left alone
    assert proc.poll() is None
    _kill_host_command(info)
    assert proc.wait() == -9  # the group's leader, and its sleep with it (same group)


def test_a_host_command_stops_once_the_job_is_gone(tmp_path, monkeypatch):
    """salloc stops its command when the job is cancelled, unless salloc itself was killed
    (bench/faults.py kill-cli: the launcher and its -E command ran on for ever): the launcher
    asks the batch system while the command runs, and stops it once the job is gone."""
    from pcocc.lifecycle import launcher

    class Backend:
        asked = 0

        def job_alive(self, jobid):
            self.asked += 1
            return not pidfile.exists() or self.asked < 3  # gone once the command's child runs

    monkeypatch.setattr(launcher, "JOB_GONE_CHECK", 0.01)
    backend = Backend()
    pidfile = tmp_path / "child.pid"
    # the command's children go too (a script's, a shell's jobs): here a sleep the shell waits for
    script = f"sh -c 'sleep 1000 & echo $! > {pidfile}; wait'"
    status = launcher.run_user_part(backend, 5, dict(os.environ), host_script=script)
    assert status == -15 and backend.asked >= 3  # SIGTERM, as a host command at the end of -b
    child = int(pidfile.read_text())
    import time

    from pcocc.procs import pid_alive, shell_status

    for _ in range(3000):  # signalled before the shell ended; its exit may take a moment
        if not pid_alive(child):
            break
        time.sleep(0.01)
    assert not pid_alive(child) and shell_status(status) == 143


def test_a_store_that_does_not_answer_does_not_end_the_session(monkeypatch):
    """gone() failing (the store or squeue unreachable for a while) is no reason to stop the
    user's shell or -E: it is asked again later."""
    from pcocc.lifecycle import launcher
    from pcocc.store import StoreError

    asked = []

    def gone():
        asked.append(1)
        if len(asked) < 3:
            raise StoreError("etcd at http://x did not answer within 10 s")
        return False

    monkeypatch.setattr(launcher, "JOB_GONE_CHECK", 0.01)
    assert launcher.call_while_alive(["sh", "-c", "sleep 0.5; exit 7"], dict(os.environ), gone) == 7 and len(asked) >= 3
