"""PNG plots of the benchmarks' tables (bench/results/NAME.json written by bench/report.py):
one horizontal bar panel per measured column, one bar per row, so that a reader can compare
at a glance what the table gives in figures.

    .venv/bin/python bench/plot.py            # every report-style JSON in bench/results
    .venv/bin/python bench/plot.py boot exec  # some of them

Which columns are what, read from the table itself: the first column, and the columns of
whole numbers right after it (e.g. "VMs", "nodes", "filled (MiB)"), name a row; every
later column whose cells read as numbers (a trailing "x", as in "50x", is dropped) is a
panel; empty cells are left out. matplotlib is imported lazily (a test extra).
"""

import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _number(cell):
    """float of a table cell, or None (text, empty)."""
    if isinstance(cell, bool):
        return None
    if isinstance(cell, (int, float)):
        return float(cell)
    text = str(cell).strip()
    if text.endswith("x"):
        text = text[:-1]
    try:
        return float(text)
    except ValueError:
        return None


def _is_whole(cell):
    return isinstance(cell, int) and not isinstance(cell, bool)


def split_columns(headers, rows):
    """(label column indexes, panel column indexes) of a table: see the module docstring."""
    labels = [0]
    i = 1
    while i < len(headers) and rows and all(_is_whole(r[i]) for r in rows):
        labels.append(i)
        i += 1
    panels = [j for j in range(i, len(headers))
              if any(_number(r[j]) is not None for r in rows) and all(_number(r[j]) is not None or str(r[j]).strip() == "" for r in rows)]
    return labels, panels


def plot(path, out=None):
    """Write the PNG of the table in JSON file path (bench/report.py's shape: headers, rows)
    beside it (or to out); returns the PNG's path, or None when the table has nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    headers, rows = data.get("headers"), data.get("rows")
    if not headers or not rows:
        return None
    labels, panels = split_columns(headers, rows)
    if not panels:
        return None
    names = [", ".join(f"{headers[i]} {r[i]}" if _is_whole(r[i]) else str(r[i]) for i in labels) for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 2.5, 0.45 * len(rows) + 1.6), squeeze=False)
    for ax, j in zip(axes[0], panels):
        values = [_number(r[j]) for r in rows]
        ys = list(range(len(rows)))
        ax.barh(ys, [v if v is not None else 0 for v in values], color="#4878a8")
        for y, v in zip(ys, values):
            if v is not None:
                ax.annotate(f"{v:g}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_title(headers[j], fontsize=8, wrap=True)
        ax.set_yticks(ys)
        ax.set_yticklabels(names if j == panels[0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(x=0.25)
    fig.suptitle(f"{data.get('benchmark', os.path.basename(path))} ({data.get('date', '')})", fontsize=9)
    fig.tight_layout()
    out = out or os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def link(md_path, png_path):
    """Add the figure to the Markdown table it draws (once), after the table's title."""
    line = f"![{os.path.basename(png_path)}]({os.path.basename(png_path)})"
    with open(md_path) as f:
        text = f.read()
    if line in text:
        return
    title, _, rest = text.partition("\n")
    with open(md_path, "w") as f:
        f.write(f"{title}\n\n{line}\n{rest}")


def main(names):
    paths = [os.path.join(RESULTS, f"{n}.json") for n in names] if names else \
        sorted(os.path.join(RESULTS, f) for f in os.listdir(RESULTS) if f.endswith(".json"))
    for path in paths:
        with open(path) as f:
            if "headers" not in json.load(f):  # not a report.py table (faults, its own writer)
                continue
        if os.path.basename(path) == "scale.json":  # bench/scale.py draws its own figure
            continue
        png = plot(path)
        md = os.path.splitext(path)[0] + ".md"
        if png and os.path.exists(md):
            link(md, png)
        print(f"{path}: {png or 'nothing to plot'}")


if __name__ == "__main__":
    main(sys.argv[1:])
