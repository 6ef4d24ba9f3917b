"""Output for people (aligned tables) and for scripts (--json)."""

import json


def dump_json(app, data):
    app.out(json.dumps(data, indent=2, sort_keys=False, default=str))


def table(app, headers, rows):
    """Print rows as an aligned table with a header line."""
    rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    app.out(fmt.format(*headers).rstrip())
    app.out(fmt.format(*("-" * w for w in widths)).rstrip())
    for row in rows:
        app.out(fmt.format(*row).rstrip())
