"""pcocc config validate|show."""

import click

from pcocc.cli.core import pass_app
from pcocc.cli.render import dump_json


@click.group()
def config():
    """Validate and show the configuration."""


@config.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_app
def validate(app, as_json):
    """Check every configuration file and report every problem found (exit status 3).

    With --json, on stdout: {"valid": true, "files": [...], "warnings": [...]} or
    {"valid": false, "problems": [{"file", "line", "key", "message"}]} (a part a problem
    lacks is null), a stable interface for scripts.
    """
    import click as _click

    from pcocc.config.loader import load_config, problem_fields
    from pcocc.errors import ConfigError, ExitStatus

    try:
        cfg = load_config(app.env, strict=True)  # every problem, templates' too
    except ConfigError as exc:
        if not as_json:
            raise
        dump_json(app, {"valid": False, "problems": [problem_fields(p) for p in exc.problems]})
        raise _click.exceptions.Exit(ExitStatus.CONFIG) from None
    if as_json:
        return dump_json(app, {"valid": True, "files": cfg.files, "warnings": list(cfg.warnings)})
    app.out(f"configuration is valid ({len(cfg.files)} files read)")
    for f in cfg.files:
        app.out(f"  {f}")


@config.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_app
def show(app, as_json):
    """Show the configuration as pcocc understood it."""
    cfg = app.config
    data = {
        "system-dir": cfg.system_dir,
        "user-dir": cfg.user_dir,
        "files": cfg.files,
        "batch": {"type": cfg.batch.type, "settings": cfg.batch.settings},
        "networks": {n.name: {"type": n.type, "settings": n.settings} for n in cfg.networks.values()},
        "resources": {r.name: {"networks": list(r.networks), "default": r.default} for r in cfg.resources.values()},
        "templates": cfg.templates.names(),
        "repos": [{"name": r.name, "path": r.path, "scope": r.scope} for r in cfg.repos],
    }
    if as_json:
        return dump_json(app, data)
    import yaml

    app.out(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
