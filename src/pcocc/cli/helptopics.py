"""pcocc help [TOPIC]: the help topics shipped with pcocc (src/pcocc/help/*.txt)."""

from importlib import resources

import click

from pcocc.cli.core import pass_app
from pcocc.errors import NotFoundError


def _topics():
    return sorted(p.name[:-4] for p in resources.files("pcocc.help").iterdir() if p.name.endswith(".txt"))


@click.command("help")
@click.argument("topic", required=False)
@pass_app
def help_(app, topic):
    """Show a help topic, or list the topics."""
    topics = _topics()
    if topic is None:
        app.out("Help topics (pcocc help TOPIC):")
        for name in topics:
            first = resources.files("pcocc.help").joinpath(f"{name}.txt").read_text().splitlines()[0]
            app.out(f"  {name:<12} {first}")
        app.out("\nFor a command: pcocc COMMAND --help")
        return
    if topic not in topics:
        raise NotFoundError(f"no help topic '{topic}'", f"Topics: {', '.join(topics)}")
    app.out(resources.files("pcocc.help").joinpath(f"{topic}.txt").read_text().rstrip())
