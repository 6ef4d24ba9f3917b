"""pcocc alloc, batch, ps, cancel: start, list and stop virtual clusters."""

import contextlib
import os
import subprocess
import time

import click

from pcocc.cli import params
from pcocc.cli.core import pass_app
from pcocc.cli.render import dump_json, table
from pcocc.errors import ConfigError, NotFoundError, UsageError


_COMMON = [
    click.option("-r", "--restart-ckpt", metavar="DIR", type=params.Path(file_okay=False),
                 help="Restart the cluster checkpointed in DIR by 'pcocc ckpt' (same DEFINITION and resources)."),
    click.option("--boot", is_flag=True, help="Boot every VM, even those whose template has a snapshot ('pcocc template snapshot')."),
    click.option("--user-data", type=params.Path(exists=True, dir_okay=False),
                 help="cloud-init user-data file for every VM (overrides the templates'): text, MIME multipart or gzip, at most 1 MiB."),
]
_PASSTHROUGH = {"ignore_unknown_options": True}
_ALLOC_HELP = """
    DEFINITION is TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], e.g. tiny:3. Other
    options go to the batch system: with SLURM, to {cmd} unchanged (e.g. -p
    PARTITION, -t TIME, -c CPUS, --mem-per-cpu MB, -J NAME); on one host
    (type: local), -c/--cpus-per-vm, -m/--mem-per-core (MiB) and -J/--job-name.

    Limits, checked before anything starts (exit status 2): at most 4096 VMs;
    counts in ASCII digits; a job name of 1 to 128 printable characters;
    user-data (--user-data or a template's user-data file) empty, UTF-8 text
    (cloud-config, script, MIME multipart) or gzip of text, a regular file of
    at most 1 MiB (cloud-init's own docs cite 16 KiB on EC2; OpenStack takes
    64 KiB, Google Cloud 256 KiB).
"""


def common_options(f):
    for opt in reversed(_COMMON):
        f = opt(f)
    return f


def _local_options(args):
    """-c, -m and -J of the local backend (upstream's local options)."""

    @click.command(add_help_option=False)
    @click.option("-J", "--job-name", type=params.JOB_NAME, default="pcocc")
    @click.option("-c", "--cpus-per-vm", type=params.Count("number of cores per VM", 1, params.MAX_CPUS_PER_VM), default=1)
    @click.option("-m", "--mem-per-core", type=params.Count("memory per core (MiB)", 16, params.MAX_MEM_PER_CORE), default=1000)
    def parse(**kw):
        return kw

    try:
        return parse.main(list(args), standalone_mode=False)
    except click.ClickException as exc:
        raise UsageError(f"{exc.format_message()} (the local backend takes -c, -m and -J)") from None


def _slurm_name(args):
    """The job name among sbatch/salloc options (checked: pcocc.names.check_job_name), or None."""
    from pcocc.names import check_job_name

    for i, a in enumerate(args):
        if a in ("-J", "--job-name") and i + 1 < len(args):
            return check_job_name(args[i + 1])
        if a.startswith("--job-name="):
            return check_job_name(a.split("=", 1)[1])
        if a.startswith("-J") and len(a) > 2:
            return check_job_name(a[2:])
    return None


def _check_user_data(app, user_data, vms, resolved):
    """Refuse, before anything starts, user-data the VMs would refuse (pcocc.userdata).

    --user-data: UserDataError (exit 2). A template's user-data file: the same
    checks, as a ConfigError naming the template (exit 3), for each VM rank
    when its path can be expanded here (a path with %{clusterdir} or
    %{jobid} is checked by the VM).
    """
    from pcocc import pathtpl, userdata

    if user_data:
        userdata.read(user_data)
        return
    seen = set()
    for vm in vms:
        value = resolved[vm.template].values.get("user-data")
        if not isinstance(value, str) or not value:
            continue
        values = {"homedir": app.env.home, "user": app.env.user, "vm_rank": vm.rank, "clusterdir": None, "jobid": None}
        try:
            path = os.path.expanduser(pathtpl.expand(value, values, app.env.environ))
        except ConfigError:
            continue  # known only once the cluster runs
        if path in seen:
            continue
        seen.add(path)
        try:
            userdata.read(path)
        except userdata.UserDataError as exc:
            raise ConfigError([f"template {vm.template}: {exc.message}"]) from None


def _split(args):
    if not args:
        raise UsageError("missing the cluster DEFINITION (e.g. tiny:3)")
    return list(args[:-1]), args[-1]


def _restart(app, restart_ckpt, definition, cpus=None, memory_mb=None):
    """{dir, manifest} of the checkpoint to restart from, checked against the definition; or None."""
    if not restart_ckpt:
        return None
    from pcocc.lifecycle import checkpoint
    from pcocc.cluster import parse_definition

    directory = os.path.abspath(restart_ckpt)
    manifest = checkpoint.load(directory)
    tset = app.config.templates
    vms = parse_definition(definition, tset)
    resolved = {name: tset.resolve(name) for name in {v.template for v in vms}}
    checkpoint.check_restart(manifest, directory, vms, resolved, cpus, memory_mb)
    return {"dir": directory, "manifest": manifest}


def _instant(app, resolved, cpus, memory_mb):
    """{template: restore entry} of the templates whose snapshot can start their VMs."""
    from pcocc.lifecycle import instant

    out = {}
    images = app.ctx.images()
    for name, res in sorted(resolved.items()):
        entry, stale = instant.lookup(images, app.env, app.config, name, res, cpus, memory_mb)
        if entry:
            out[name] = entry
        elif stale:
            app.info(f"template {name}: its snapshot cannot be used ({stale}): its VMs boot")
    if out:
        app.info(f"restoring the VMs of {', '.join(out)} from their template's snapshot")
    return out or None


def _submit_local(app, definition, batch_opts, user_data, script=None, restart_ckpt=None, boot=False, hold=False):
    from pcocc.cluster import parse_definition

    local = _local_options(batch_opts)
    tset = app.config.templates
    vms = parse_definition(definition, tset)
    resolved = {name: tset.resolve(name) for name in {v.template for v in vms}}
    cpus, mem = local["cpus_per_vm"], local["mem_per_core"] * local["cpus_per_vm"]
    _check_user_data(app, user_data, vms, resolved)
    restart = _restart(app, restart_ckpt, definition, cpus, mem)
    backend = app.ctx.backend()
    opts = {
        "name": local["job_name"], "cpus": cpus, "mem_per_core": local["mem_per_core"], "definition": definition,
        "user_data": os.path.abspath(user_data) if user_data else None, "script": script, "cwd": os.getcwd(),
        "restart": restart, "hold": hold,
        "instant": None if restart or boot or user_data else _instant(app, resolved, cpus, mem),
    }
    return backend, backend.submit(vms, resolved, opts), local["job_name"]


def _slurm_restart(app, restart_ckpt, definition):
    """The checkpoint's directory, checked here first (the launcher checks it again); or None."""
    restart = _restart(app, restart_ckpt, definition)
    return restart["dir"] if restart else None


def _slurm_opts(app, definition, batch_opts, user_data, **launcher_opts):
    """(number of VMs, launcher options) for a SLURM submission; checks the definition first."""
    from pcocc.cluster import parse_definition

    tset = app.config.templates
    vms = parse_definition(definition, tset)
    name = _slurm_name(batch_opts) or "pcocc"
    _check_user_data(app, user_data, vms, {n: tset.resolve(n) for n in {v.template for v in vms}})
    return len(vms), {"name": name, "user_data": os.path.abspath(user_data) if user_data else None, **launcher_opts}


def _progress(app, jobid):
    start = time.monotonic()

    def show(running, total):
        app.info(f"cluster {jobid}: {running}/{total} VMs running ({time.monotonic() - start:.1f} s)")

    return show


@click.command(context_settings=_PASSTHROUGH, help="Run a virtual cluster and a shell in its allocation; the cluster ends with the shell.\n" + _ALLOC_HELP.format(cmd="salloc"))
@common_options
@click.option("-E", "--alloc-script", type=params.Path(exists=True, dir_okay=False), help="Run this script on the host instead of a shell; the cluster ends with it.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[BATCH_OPTIONS]... DEFINITION")
@pass_app
def alloc(app, restart_ckpt, boot, user_data, alloc_script, args):
    batch_opts, definition = _split(args)
    script = os.path.abspath(alloc_script) if alloc_script else None
    if script and not os.access(script, os.X_OK):  # before anything starts, not once the cluster runs
        raise UsageError(f"-E/--alloc-script {alloc_script}: not executable (chmod +x it)")
    if app.config.batch.type == "slurm":
        n_vms, opts = _slurm_opts(app, definition, batch_opts, user_data, host_script=script,
                                  restart_dir=_slurm_restart(app, restart_ckpt, definition), boot=boot)
        argv = app.ctx.backend().interactive_allocation(n_vms, definition, opts, batch_opts)
        os.execvp(argv[0], argv)
    # held: the cluster ends with this process, however it ends (exit, SIGHUP, SIGTERM, SIGKILL)
    backend, jobid, name = _submit_local(app, definition, batch_opts, user_data, restart_ckpt=restart_ckpt, boot=boot, hold=True)
    try:
        app.info(f"cluster {jobid} starting")
        backend.wait_ready(jobid, _progress(app, jobid))
        env = dict(app.env.environ, PCOCC_JOB_ID=str(jobid), PCOCC_JOB_NAME=name, PCOCC_ALLOCATION="1")
        argv = [script] if script else [env.get("SHELL") or "/bin/sh"]
        if not script:
            app.info(f"cluster {jobid} ready: a shell in its allocation; exit it to end the cluster")
        code = subprocess.call(argv, env=env)
    finally:
        app.info(f"cluster {jobid}: stopping")
        with contextlib.suppress(NotFoundError):  # it may have ended already: keep the first error
            backend.cancel(jobid)
    if code:
        raise click.exceptions.Exit(code)


@click.command(context_settings=_PASSTHROUGH, help="Submit a virtual cluster as a batch job and print its job id.\n" + _ALLOC_HELP.format(cmd="sbatch"))
@common_options
@click.option("-b", "--batch-script", type=params.Path(exists=True, dir_okay=False), help="Run this script in vm0 once the cluster runs; the cluster ends with it.")
@click.option("-E", "--host-script", type=params.Path(exists=True, dir_okay=False), help="Run this script on the first host once the cluster runs (SLURM); the cluster ends with it.")
@click.option("--wait", is_flag=True, help="Return only when every VM runs (the job id is printed first).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[BATCH_OPTIONS]... DEFINITION")
@pass_app
def batch(app, restart_ckpt, boot, user_data, batch_script, host_script, wait, args):
    batch_opts, definition = _split(args)
    script = os.path.abspath(batch_script) if batch_script else None
    if app.config.batch.type == "slurm":
        n_vms, opts = _slurm_opts(app, definition, batch_opts, user_data, script=script,
                                  host_script=os.path.abspath(host_script) if host_script else None,
                                  restart_dir=_slurm_restart(app, restart_ckpt, definition), boot=boot)
        backend = app.ctx.backend()
        jobid = backend.submit_batch(n_vms, definition, opts, batch_opts)
    else:
        if host_script:
            raise UsageError("-E/--host-script needs the SLURM backend (on one host, use 'pcocc alloc -E')")
        backend, jobid, _ = _submit_local(app, definition, batch_opts, user_data, script=script, restart_ckpt=restart_ckpt, boot=boot)
    try:
        app.out(str(jobid))
        app.env.stdout.flush()
        if wait:
            backend.wait_ready(jobid, _progress(app, jobid), timeout=3600)
    except KeyboardInterrupt:  # as sbatch: the job is submitted, only the waiting stops
        app.info(f"cluster {jobid} goes on (stop it with 'pcocc cancel -j {jobid}')")
        raise


@click.command()
@click.option("-u", "--user", type=params.USER_NAME, help="Another user's clusters (what the batch system shows of them).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_app
def ps(app, user, as_json):
    """List your running virtual clusters."""
    backend = app.ctx.backend()
    if user and user != app.env.user and app.config.batch.type != "slurm":
        raise UsageError("-u needs the SLURM backend: on one host, each user sees only their own clusters")
    jobs = backend.jobs(user) if user else backend.jobs()
    rows = []
    for info, vms in jobs:
        rows.append({
            "jobid": info["jobid"], "name": info["name"], "user": info["owner"], "host": info.get("host"),
            "definition": info["definition"], "vms": len(vms), "state": info["state"],
            "vm_states": {v["name"]: v["state"] for v in vms},
            "errors": {v["name"]: v["error"] for v in vms if v.get("error")},
            "duration": int(time.time() - info["created"]) if info.get("created") else None,
        })
    if as_json:
        return dump_json(app, rows)
    if not rows:
        app.info("No running virtual cluster.")
        return
    table(app, ["JOBID", "NAME", "USER", "DEFINITION", "VMS", "STATE", "DURATION"],
          [[r["jobid"], one_line(r["name"]), one_line(r["user"]), one_line(r["definition"]), _vm_summary(r["vm_states"]), r["state"],
            _duration(r["duration"])] for r in rows])
    for r in rows:  # names and errors are data (SLURM job names are anyone's): one line each
        for vm, err in r["errors"].items():
            app.out(f"{r['jobid']}/{vm}: {one_line(err)}")


def one_line(value):
    from pcocc.names import one_line as escape

    return escape(value) if isinstance(value, str) else value


def _vm_summary(states):
    counts = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _duration(seconds):
    if seconds is None:
        return "-"
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


@click.command()
@click.option("-j", "--jobid", type=params.JOB_ID, help="Job id of the cluster.")
@click.option("-J", "--jobname", type=params.JOB_NAME, help="Job name of the cluster.")
@pass_app
def cancel(app, jobid, jobname):
    """Stop a virtual cluster (by default: your only one)."""
    backend = app.ctx.backend()
    jobid = backend.find(jobid, jobname)
    backend.cancel(jobid)
    app.info(f"cluster {jobid} stopped")


