"""pcocc alloc, batch, ps, cancel: start, list and stop virtual clusters."""

import os
import subprocess
import sys
import time

import click

from pcocc.cli.core import pass_app
from pcocc.cli.render import dump_json, table


_LAUNCH_OPTIONS = [
    click.option("-J", "--job-name", default="pcocc", show_default=True, help="Name of the cluster's job."),
    click.option("-c", "--cpus-per-vm", type=click.IntRange(1), default=1, show_default=True, help="Cores (vCPUs) of each VM."),
    click.option("-m", "--mem-per-core", type=click.IntRange(16), default=1000, show_default=True, help="Memory per core, in MiB."),
    click.option("--user-data", type=click.Path(exists=True, dir_okay=False), help="cloud-init user-data file for every VM (overrides the templates')."),
    click.option("-r", "--restart-ckpt", metavar="DIR", help="Restart from a checkpoint (not available yet)."),
]


def launch_options(f):
    for opt in reversed(_LAUNCH_OPTIONS):
        f = opt(f)
    return f


def _submit(app, definition, job_name, cpus_per_vm, mem_per_core, user_data, restart_ckpt, script=None):
    from pcocc.cluster import parse_definition
    from pcocc.errors import NotAvailableError

    if restart_ckpt:
        raise NotAvailableError("restarting from a checkpoint is not available yet")
    tset = app.config.templates
    vms = parse_definition(definition, tset)
    resolved = {name: tset.resolve(name) for name in {v.template for v in vms}}
    backend = app.ctx.backend()
    opts = {
        "name": job_name, "cpus": cpus_per_vm, "mem_per_core": mem_per_core, "definition": definition,
        "user_data": os.path.abspath(user_data) if user_data else None, "script": script, "cwd": os.getcwd(),
    }
    return backend, backend.submit(vms, resolved, opts)


def _progress(app, jobid):
    start = time.monotonic()

    def show(running, total):
        app.info(f"cluster {jobid}: {running}/{total} VMs running ({time.monotonic() - start:.1f} s)")

    return show


@click.command(context_settings={"ignore_unknown_options": False})
@launch_options
@click.option("-E", "--alloc-script", type=click.Path(exists=True, dir_okay=False), help="Run this script on the host instead of a shell; the cluster ends with it.")
@click.argument("definition")
@pass_app
def alloc(app, definition, alloc_script, **opts):
    """Run a virtual cluster and a shell in its allocation; the cluster ends with the shell.

    DEFINITION is TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], e.g. tiny:3.
    """
    backend, jobid = _submit(app, definition, **opts)
    try:
        app.info(f"cluster {jobid} starting")
        backend.wait_ready(jobid, _progress(app, jobid))
        env = dict(app.env.environ, PCOCC_JOB_ID=str(jobid), PCOCC_JOB_NAME=opts["job_name"], PCOCC_ALLOCATION="1")
        argv = [os.path.abspath(alloc_script)] if alloc_script else [env.get("SHELL") or "/bin/sh"]
        if not alloc_script:
            app.info(f"cluster {jobid} ready: a shell in its allocation; exit it to end the cluster")
        code = subprocess.call(argv, env=env)
    finally:
        app.info(f"cluster {jobid}: stopping")
        backend.cancel(jobid)
    if code:
        sys.exit(code)


@click.command()
@launch_options
@click.option("-b", "--batch-script", type=click.Path(exists=True, dir_okay=False), help="Run this script in vm0 once the cluster runs; the cluster ends with it (output in pcocc_JOBID.out).")
@click.option("-w", "--wait", is_flag=True, help="Return only when every VM runs.")
@click.argument("definition")
@pass_app
def batch(app, definition, batch_script, wait, **opts):
    """Submit a virtual cluster as a batch job and print its job id.

    DEFINITION is TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], e.g. tiny:3.
    """
    backend, jobid = _submit(app, definition, script=os.path.abspath(batch_script) if batch_script else None, **opts)
    if wait:
        backend.wait_ready(jobid, _progress(app, jobid))
    app.out(str(jobid))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_app
def ps(app, as_json):
    """List your running virtual clusters."""
    jobs = app.ctx.backend().jobs()
    rows = []
    for info, vms in jobs:
        states = {}
        for v in vms:
            states[v["state"]] = states.get(v["state"], 0) + 1
        rows.append({
            "jobid": info["jobid"], "name": info["name"], "user": info["owner"], "host": info.get("host"),
            "definition": info["definition"], "vms": len(vms), "state": info["state"],
            "vm_states": {v["name"]: v["state"] for v in vms},
            "errors": {v["name"]: v["error"] for v in vms if v.get("error")},
            "duration": int(time.time() - info["created"]),
        })
    if as_json:
        return dump_json(app, rows)
    if not rows:
        app.info("No running virtual cluster.")
        return
    table(app, ["JOBID", "NAME", "USER", "DEFINITION", "VMS", "STATE", "DURATION"],
          [[r["jobid"], r["name"], r["user"], r["definition"], _vm_summary(r["vm_states"]), r["state"], _duration(r["duration"])] for r in rows])
    for r in rows:
        for vm, err in r["errors"].items():
            app.out(f"{r['jobid']}/{vm}: {err}")


def _vm_summary(states):
    counts = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _duration(seconds):
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


@click.command()
@click.option("-j", "--jobid", type=int, help="Job id of the cluster.")
@click.option("-J", "--jobname", help="Job name of the cluster.")
@pass_app
def cancel(app, jobid, jobname):
    """Stop a virtual cluster (by default: your only one)."""
    backend = app.ctx.backend()
    jobid = backend.find(jobid, jobname)
    backend.cancel(jobid)
    app.info(f"cluster {jobid} stopped")


