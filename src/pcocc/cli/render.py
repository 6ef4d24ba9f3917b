"""Output for people (aligned tables, colour on a terminal only) and for scripts (--json)."""

import json
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLOURS = {"green": "32", "yellow": "33", "red": "31", "blue": "34", "dim": "2"}


def dump_json(app, data):
    app.out(json.dumps(data, indent=2, sort_keys=False, default=str))


def colour(text, name, enabled):
    """text in colour `name` (COLOURS) when enabled (stdout is a terminal and NO_COLOR unset), else text."""
    if not enabled or name not in COLOURS:
        return text
    return f"\x1b[{COLOURS[name]}m{text}\x1b[0m"


def colour_enabled(app):
    """Whether stdout is a terminal that should get colour (https://no-color.org: NO_COLOR unset)."""
    out = app.env.stdout
    return bool(getattr(out, "isatty", None) and out.isatty()) and not app.env.environ.get("NO_COLOR")


def _width(cell):
    return len(_ANSI.sub("", cell))


def table_lines(headers, rows, header=True):
    """The lines of an aligned table: a header line and its rule (unless header=False), then rows.

    headers: [str]; rows: [[value]] (None shows as empty); cells may hold colour codes, which
    take no width.
    """
    rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, _width(c)) for w, c in zip(widths, row)]

    def line(cells):
        return "  ".join(c + " " * (w - _width(c)) for c, w in zip(cells, widths)).rstrip()

    out = []
    if header:
        out.append(line(headers))
        out.append(line(["-" * w for w in widths]))
    out.extend(line(row) for row in rows)
    return out


def table(app, headers, rows, header=True):
    """Print rows as an aligned table with a header line (unless header=False)."""
    for text in table_lines(headers, rows, header):
        app.out(text)
