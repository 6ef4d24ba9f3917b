"""CLI start-up latency: `pcocc --help` and `pcocc template list` (goal <= 0.15 s each).

Runs the installed `pcocc` entry point (the one users run) with the upstream-style
test config, N times each, interleaved with a bare `python -c pass` for reference,
and reports the median and the best run.
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

import report

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "upstream")
RUNS = int(os.environ.get("BENCH_RUNS", "20"))


def timed(argv, env):
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main():
    pcocc = shutil.which("pcocc", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if not pcocc:
        sys.exit("pcocc is not installed in this environment (run scripts/setup, then .venv/bin/python bench/startup.py)")
    env = dict(os.environ, PCOCC_SYSTEM_CONF_DIR=os.path.join(FIXTURE, "etc"), PCOCC_USER_CONF_DIR=os.path.join(FIXTURE, "user"))
    cases = {
        "python -c pass (reference)": [sys.executable, "-c", "pass"],
        "pcocc --help": [pcocc, "--help"],
        "pcocc template list": [pcocc, "template", "list"],
    }
    times = {name: [] for name in cases}
    for _ in range(RUNS):  # interleaved, so that noise hits every case alike
        for name, argv in cases.items():
            times[name].append(timed(argv, env))
    rows = [[name, f"{statistics.median(t):.3f}", f"{min(t):.3f}", "0.15" if name.startswith("pcocc") else ""] for name, t in times.items()]
    report.write("startup", "CLI start-up time (seconds)", ["command", "median", "best", "goal"], rows, {"runs": RUNS})


if __name__ == "__main__":
    main()
