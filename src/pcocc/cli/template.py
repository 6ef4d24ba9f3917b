"""pcocc template list|show."""

import click

from pcocc.cli.core import pass_app
from pcocc.cli.render import dump_json, table
from pcocc.templates import IMAGE_SCOPE, SETTINGS


@click.group()
def template():
    """List and show VM templates."""


def _summary(tset, name):
    r = tset.resolve(name)
    tpl = tset.get(name)
    return {
        "name": name,
        "scope": tpl.scope,
        "description": r["description"],
        "image": r["image"] if r["image"] is not False else None,
        "resource-set": r["resource-set"],
        "inherits": tpl.parent,
        "file": _where(tpl),
    }


def _where(tpl):
    """file:line of a written template; for a per-image template, the image it stands for."""
    return tpl.file if tpl.scope == IMAGE_SCOPE else f"{tpl.file}:{tpl.line}"


_ORDER = {"user": 0, "system": 1, IMAGE_SCOPE: 2}


@template.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("-a", "--all", "show_all", is_flag=True,
              help="Also list the per-image templates (every image is a template of its name when a resource set is the default).")
@pass_app
def list_(app, as_json, show_all):
    """List the templates you can use (user templates first).

    As in the original pcocc, when resources.yaml marks a resource set as the
    default, every image of the repositories is also a template of the same
    name (unless a template of that name is written): those are listed with
    --all only, since it reads every repository.
    """
    tset = app.config.templates
    rows = [_summary(tset, n) for n in tset.names(images=show_all)]
    rows.sort(key=lambda r: (_ORDER.get(r["scope"], 3), r["name"]))
    if as_json:
        return dump_json(app, rows)
    if not rows:
        app.info("No templates defined (see 'pcocc help templates').")
        return
    for scope, title in (("user", "User templates"), ("system", "System templates"), (IMAGE_SCOPE, "Image templates")):
        part = [r for r in rows if r["scope"] == scope]
        if part:
            app.out(title)
            table(app, ["NAME", "DESCRIPTION", "RESOURCES", "IMAGE"], [[r["name"], r["description"], r["resource-set"], r["image"]] for r in part])
            app.out()


@template.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also show settings left at their default.")
@pass_app
def show(app, name, as_json, show_all):
    """Show the settings of template NAME and where each value comes from."""
    tset = app.config.templates
    resolved = tset.resolve(name)
    tpl = tset.get(name)
    settings = []
    for key, setting in SETTINGS.items():
        value, origin = resolved.values[key], resolved.origin[key]
        if origin is None and not show_all and key != "resource-set":
            continue
        settings.append({"key": key, "value": value, "from": origin or "default", "inherited": resolved.inherited(key)})
    if as_json:
        return dump_json(app, {"name": name, "scope": tpl.scope, "file": _where(tpl), "chain": [t.name for t in tset.chain(name)], "settings": settings})
    if tpl.scope == IMAGE_SCOPE:
        app.out(f"Template {name} (per-image: {tpl.file[1:-1]}, with the default resource set)")
    else:
        app.out(f"Template {name} ({tpl.scope}, {tpl.file}:{tpl.line})")
    rows = []
    for s in settings:
        for key, text in _lines(s["key"], s["value"]):
            rows.append([key, text, s["from"]])
    table(app, ["SETTING", "VALUE", "FROM"], rows)


def _lines(key, value):
    """One (label, text) row per scalar, per mount point, per drive."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return [(f"{key}.{k}", _compact(v)) for k, v in value.items()]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [(f"{key}[{i}]", _compact(v)) for i, v in enumerate(value)]
    if isinstance(value, list):
        return [(key, " ".join(map(str, value)) or "-")]
    if isinstance(value, dict):
        return [(key, _compact(value) or "-")]
    return [(key, "-" if value is None else str(value))]


def _compact(mapping):
    return " ".join(f"{k}={v}" for k, v in mapping.items() if v is not None)


@template.command("snapshot")
@click.option("-c", "--cpus-per-vm", type=click.IntRange(1), default=1, show_default=True, help="Cores of the VMs the snapshot will start.")
@click.option("-m", "--mem-per-core", type=click.IntRange(16), default=1000, show_default=True, help="MiB per core of those VMs.")
@click.option("--delete", is_flag=True, help="Delete the template's snapshot instead.")
@click.argument("name")
@pass_app
def snapshot(app, name, cpus_per_vm, mem_per_core, delete):
    """Boot a VM of template NAME and keep its memory, for instant clusters.

    Then 'pcocc alloc|batch NAME:N' (with the same -c and -m; under SLURM, VMs
    with the same cores and memory) restores its VMs from the snapshot instead
    of booting them, and gives each its own hostname, ssh host keys, machine
    id, randomness, MACs and DHCP lease through its guest agent.
    The snapshot is not used (the VMs boot) once the template or the image
    revision it names changed; take it again then. --boot on alloc|batch boots
    anyway. Kept in ~/.pcocc/snapshots/NAME.
    """
    import contextlib
    import os
    import time

    from pcocc.lifecycle import instant
    from pcocc.cli.access import Targets
    from pcocc.cli.saving import take_checkpoint
    from pcocc.cluster import VMSpec
    from pcocc.errors import CommandError, NotFoundError, PcoccError

    tset = app.config.templates
    resolved = tset.resolve(name)
    if delete:
        instant.delete(app.env, name)
        app.info(f"template {name}: snapshot deleted")
        return
    reasons = instant.refusals(app.config, resolved.values)
    if reasons:
        raise PcoccError(f"cannot snapshot template '{name}': {reasons[0]}")
    directory = instant.snapshot_dir(app.env, name)
    os.makedirs(os.path.dirname(directory), mode=0o700, exist_ok=True)
    backend = app.ctx.backend()
    started = time.monotonic()
    if app.config.batch.type == "slurm":  # a 1-VM job of that size, booted
        opts = {"name": f"snapshot-{name}", "user_data": None, "boot": True}
        jobid = backend.submit_batch(1, f"{name}:1", opts, ["-c", str(cpus_per_vm), f"--mem-per-cpu={mem_per_core}"])
    else:
        opts = {"name": f"snapshot-{name}", "cpus": cpus_per_vm, "mem_per_core": mem_per_core, "definition": f"{name}:1",
                "user_data": None, "script": None, "cwd": os.getcwd()}
        jobid = backend.submit([VMSpec(0, name)], {name: resolved}, opts)
    try:
        app.info(f"template {name}: booting a VM (cluster {jobid})")
        backend.wait_ready(jobid)
        targets = Targets(app, jobid, None, "all")
        targets.call_one("exec", argv=["sync"])  # what the boot wrote goes to the disk delta
        extra = {"snapshot": {"template": name, "cpus": cpus_per_vm, "mem_per_core": mem_per_core}}
        take_checkpoint(app, targets, directory, force=True, extra=extra)
    finally:
        with contextlib.suppress(NotFoundError, CommandError):  # under SLURM it may be over already
            backend.cancel(jobid)
    app.info(f"template {name}: snapshot taken in {time.monotonic() - started:.1f} s ({directory}); "
             f"'pcocc alloc|batch -c {cpus_per_vm} -m {mem_per_core} {name}:N' restores from it")
