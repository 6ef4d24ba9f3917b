"""pcocc help [NAME]: a command's page, a configuration file's, or another help topic.

As in the original, `pcocc help batch` is the page of the batch command (pcocc-batch(1),
which `man pcocc-batch` shows too); the configuration files' pages are `help batch.yaml`,
`help templates.yaml`... (pcocc-templates.yaml(5)), from src/pcocc/help/*.txt, where the
other topics (exit-codes, history, json) live as well. A configuration topic that is not
also a command answers to its short name (`help templates`).
"""

from importlib import resources

import click

from pcocc.cli.core import pass_app
from pcocc.errors import NotFoundError

# configuration files and their topic (src/pcocc/help/<topic>.txt)
CONFIG_FILES = {"batch.yaml": "batch", "networks.yaml": "networks", "resources.yaml": "networks", "repos.yaml": "repos",
                "templates.yaml": "templates"}
TUTORIALS = ("newvm-tutorial", "cloudconfig-tutorial", "9pmount-tutorial")  # in the order to read them


def _topics():
    return sorted(p.name[:-4] for p in resources.files("pcocc.help").iterdir() if p.name.endswith(".txt"))


def _text(topic):
    return resources.files("pcocc.help").joinpath(f"{topic}.txt").read_text()


def _command_page(ctx, words):
    """The help of command `words` (["image", "list"]), or None when there is no such command."""
    from pcocc.cli.core import HIDDEN

    command, parent = ctx.find_root().command, ctx.find_root()
    path = ["pcocc"]
    for word in words:
        if not isinstance(command, click.Group) or (len(path) == 1 and word in HIDDEN):
            return None
        sub = command.get_command(parent, word)
        if sub is None:
            return None
        path.append(word)
        parent = click.Context(sub, info_name=word, parent=parent)
        command = sub
    return command.get_help(parent)


@click.command("help")
@click.argument("name", nargs=-1)
@click.pass_context
@pass_app
def help_(app, ctx, name):
    """Show the page of a command (pcocc help batch, pcocc help image list), of a
    configuration file (pcocc help templates.yaml) or a help topic; without NAME, list them."""
    topics = _topics()
    if not name:
        from pcocc.cli.core import COMMANDS, HIDDEN

        app.out("Commands (pcocc help COMMAND, or man pcocc-COMMAND):")
        app.out("  " + ", ".join(n for n in COMMANDS if n not in HIDDEN))
        app.out("\nConfiguration files (pcocc help FILE, or man pcocc-FILE):")
        for file, topic in CONFIG_FILES.items():
            app.out(f"  {file:<16} {_text(topic).splitlines()[0]}")
        app.out("\nTutorials (pcocc help TUTORIAL, or man pcocc-TUTORIAL):")
        for topic in TUTORIALS:
            app.out(f"  {topic:<21} {_text(topic).splitlines()[0]}")
        app.out("\nOther topics (pcocc help TOPIC):")
        for topic in topics:
            if topic not in CONFIG_FILES.values() and topic not in TUTORIALS:
                app.out(f"  {topic:<16} {_text(topic).splitlines()[0]}")
        return
    page = _command_page(ctx, name)
    if page is not None:
        app.out(page)
        return
    key = " ".join(name)
    topic = CONFIG_FILES.get(key) or (key if key in topics else None)
    if topic is None:
        raise NotFoundError(f"no command or help topic '{key}'",
                            f"Topics: {', '.join([*CONFIG_FILES, *(t for t in topics if t not in CONFIG_FILES.values())])}")
    app.out(_text(topic).rstrip())
