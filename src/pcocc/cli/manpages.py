"""Man pages of pcocc: pcocc(1) and pcocc-COMMAND(1) from the commands' own help (click-man),
pcocc-FILE(5) from the configuration help topics and pcocc-NAME-tutorial(7) from the
tutorials (src/pcocc/help/*.txt), the sections the original's pages used.

`scripts/setup` writes them into the venv's share/man, which man(1) searches for a user
whose PATH holds the venv's bin (manpath(5): a bin directory's ../share/man), so that
`man pcocc-alloc` works after the setup, as it did for the original's packages.

    python -m pcocc.cli.manpages DIR     # DIR/man1/*.1, DIR/man5/*.5, DIR/man7/*.7
"""

import datetime
import importlib
import os
import sys
from importlib import resources

import click

# configuration files and the help topic that documents each (pcocc-FILE(5))
CONFIG_PAGES = {"batch.yaml": "batch", "networks.yaml": "networks", "resources.yaml": "networks", "repos.yaml": "repos",
                "templates.yaml": "templates"}
# the tutorials (pcocc-NAME(7), help topic NAME), as the original named them
TUTORIALS = ("newvm-tutorial", "cloudconfig-tutorial", "9pmount-tutorial")


def full_group():
    """The pcocc group with every command loaded (the CLI's own group loads them lazily, which
    click-man, reading `Group.commands`, would not see). Internal commands are left out."""
    from pcocc.cli import core

    group = click.Group("pcocc", help=core.program.help, params=list(core.program.params))
    for name, (module, attr, _) in core.COMMANDS.items():
        if name not in core.HIDDEN:
            group.add_command(getattr(importlib.import_module(f"pcocc.cli.{module}"), attr), name)
    return group


def config_page(name, topic, date, section=5):
    """The roff text of pcocc-NAME(section), from help topic `topic` (plain text, kept as is)."""
    text = resources.files("pcocc.help").joinpath(f"{topic}.txt").read_text()
    first, _, rest = text.partition("\n")
    body = "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in rest.replace("\\", "\\\\").splitlines())
    return (f'.TH "PCOCC-{name.upper()}" "{section}" "{date}" "pcocc" "pcocc manual"\n.SH NAME\npcocc-{name} \\- {first.strip()}\n'
            f".SH DESCRIPTION\n.nf\n{body}\n.fi\n.SH SEE ALSO\npcocc(1)\n")


def write(target):
    """Write every page under target (man1/, man5/, man7/); returns the paths written."""
    from click_man.core import write_man_pages

    from pcocc import __version__

    date = datetime.date.today().isoformat()
    man1, man5, man7 = (os.path.join(target, d) for d in ("man1", "man5", "man7"))
    for d in (man1, man5, man7):
        os.makedirs(d, exist_ok=True)
    write_man_pages("pcocc", full_group(), version=__version__, target_dir=man1, date=date)
    for page in os.listdir(man1):  # a text line starting with ' is a troff control line: it would vanish
        path = os.path.join(man1, page)
        with open(path) as f:
            lines = f.read().split("\n")
        with open(path, "w") as f:
            f.write("\n".join("\\&" + line if line.startswith("'") else line for line in lines))
    for name, topic in CONFIG_PAGES.items():
        with open(os.path.join(man5, f"pcocc-{name}.5"), "w") as f:
            f.write(config_page(name, topic, date))
    for name in TUTORIALS:
        with open(os.path.join(man7, f"pcocc-{name}.7"), "w") as f:
            f.write(config_page(name, name, date, section=7))
    return sorted(os.path.join(d, f) for d in (man1, man5, man7) for f in os.listdir(d))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pcocc.cli.manpages DIR")
    print(f"{len(write(sys.argv[1]))} man pages in {sys.argv[1]}")
