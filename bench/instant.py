"""Instant clusters: `pcocc batch --wait tiny:N` restored from the template's snapshot, against a cold boot
(goal: instant <= 0.2 x cold).

Both are timed from the command's start to its return, which is when every
VM's guest agent answered (and, for restored VMs, each got its own identity).
Runs alternate so that machine noise hits both alike. The snapshot is taken
once (`pcocc template snapshot`), and its time reported.

Needs the tiny image (built on first use, cached). Run with the venv's python:
    .venv/bin/python bench/instant.py     (BENCH_SIZES=1,2,4, BENCH_REPS=2)
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import report
from boot import PCOCC, setup

SIZES = [int(n) for n in os.environ.get("BENCH_SIZES", "1,2,4").split(",")]
REPS = int(os.environ.get("BENCH_REPS", "2"))
MEM_MB = 256


def timed_cluster(env, n, boot):
    t0 = time.perf_counter()
    r = subprocess.run([PCOCC, "batch", "-m", str(MEM_MB), *(["--boot"] if boot else []), "--wait", f"tiny:{n}"],
                       env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    try:
        if r.returncode != 0:
            raise SystemExit(f"pcocc batch failed: {r.stderr}")
        if not boot and "restoring" not in r.stderr:
            raise SystemExit(f"the snapshot was not used: {r.stderr}")
        names = subprocess.run([PCOCC, "exec", "-j", r.stdout.strip(), "hostname"], env=env, capture_output=True, text=True).stdout
        if any(f"vm{i}" not in names for i in range(n)):
            raise SystemExit(f"the VMs do not have their own names: {names}")
    finally:
        subprocess.run([PCOCC, "cancel"], env=env, capture_output=True)
    return elapsed


def main():
    with tempfile.TemporaryDirectory(prefix="pcocc-bench-", dir=os.environ.get("BENCH_TMP")) as work:
        env, *_ = setup(work)
        t0 = time.perf_counter()
        r = subprocess.run([PCOCC, "template", "snapshot", "-m", str(MEM_MB), "tiny"], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"pcocc template snapshot failed: {r.stderr}")
        snap = time.perf_counter() - t0
        rows, raw = [], {}
        for n in SIZES:
            cold, instant = [], []
            for _ in range(REPS):
                cold.append(timed_cluster(env, n, boot=True))
                instant.append(timed_cluster(env, n, boot=False))
                print(f"N={n}: cold {cold[-1]:.2f} s, instant {instant[-1]:.2f} s", file=sys.stderr)
            c, i = statistics.median(cold), statistics.median(instant)
            raw[n] = {"cold": cold, "instant": instant}
            rows.append([n, f"{c:.2f}", f"{i:.2f}", f"{i / c:.2f}"])
        report.write("instant", f"Start of N VMs to every guest agent answering (seconds, median of {REPS}, {MEM_MB} MiB VMs)",
                     ["VMs", "cold boot", "instant (from snapshot)", "ratio"], rows,
                     {"goal": "ratio <= 0.2", "snapshot_seconds": round(snap, 2), "runs": json.dumps(raw)})


if __name__ == "__main__":
    main()
