"""Write a benchmark's figures as JSON and as a Markdown table in bench/results/."""

import json
import os
import platform
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write(name, title, headers, rows, extra=None):
    os.makedirs(RESULTS, exist_ok=True)
    data = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "headers": headers,
        "rows": rows,
        **(extra or {}),
    }
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2)
    lines = [f"# {title}", "", f"{data['date']}, {data['machine']['cpus']} CPUs, Python {data['machine']['python']}", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    for key, value in (extra or {}).items():
        lines.append(f"\n{key}: {value}")
    md = os.path.join(RESULTS, f"{name}.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:  # the figure beside the table (bench/plot.py); the table stands without it
        import plot

        png = plot.plot(os.path.join(RESULTS, f"{name}.json"))
        if png:
            plot.link(md, png)
    except ImportError as exc:
        print(f"no plot: {exc} (matplotlib comes with the test extras: pip install -e '.[test]')")
