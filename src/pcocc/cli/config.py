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
    """Check every configuration file and report every problem found."""
    cfg = app.config  # raises ConfigError listing every problem
    if as_json:
        return dump_json(app, {"valid": True, "files": cfg.files})
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
