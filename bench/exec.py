"""Streamed `pcocc exec` on 1 and 4 VMs: first-line latency, Ctrl-C to prompt, throughput.

first line: from starting `pcocc exec -n 'echo first; sleep 1; echo second'` (the CLI's own
start included, as a user sees it) to its first line on our end of its stdout (with 4 VMs:
the first line of the last VM to print one). Ctrl-C: from SIGINT to the CLI, sent once every
VM printed that its command started (`sleep 1000 & sleep 1000 & echo started; wait`), to the
CLI's exit, which waits for every VM to confirm that the command's process group was killed.
throughput: BENCH_MIB MiB of 100-byte lines from each VM (`yes ... | head -c`), the CLI's
stdout to /dev/null, total bytes over the wall time of the whole exec.
Medians of BENCH_REPS runs. Goals (issue 14): first line <= 0.5 s, Ctrl-C <= 1 s under emulation.

Needs the tiny image (built on first use, cached). Run with the venv's python.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import report
from boot import PCOCC, setup

REPS = int(os.environ.get("BENCH_REPS", "5"))
SIZES = [int(n) for n in os.environ.get("BENCH_SIZES", "1,4").split(",")]
MIB = int(os.environ.get("BENCH_MIB", "32"))
MEM_MB = 256
LINE = "a" * 99


def first_line(env, n):
    t0 = time.perf_counter()
    proc = subprocess.Popen([PCOCC, "exec", "-n", "echo first; sleep 1; echo second"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = set()
    try:
        while len(seen) < n:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"exec ended early: {proc.stderr.read().decode()}")
            if line.rstrip().endswith(b"first"):
                seen.add(line.split(b":")[0])
        elapsed = time.perf_counter() - t0
        proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return elapsed


def ctrl_c(env, n):
    proc = subprocess.Popen([PCOCC, "exec", "-n", "sleep 1000 & sleep 1000 & echo started; wait"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(n):
            if not proc.stdout.readline():
                raise SystemExit(f"exec ended early: {proc.stderr.read().decode()}")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=600)
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 130:
        raise SystemExit(f"exec after Ctrl-C: status {proc.returncode}: {proc.stderr.read().decode()}")
    left = subprocess.run([PCOCC, "exec", "-n", "ps -o args | grep -c '^sleep 1000' || true"], env=env, capture_output=True, text=True)
    if any(not line.endswith(" 0") and line != "0" for line in left.stdout.splitlines()):
        raise SystemExit(f"processes left after Ctrl-C: {left.stdout}")
    return elapsed


def throughput(env, n):
    t0 = time.perf_counter()
    r = subprocess.run([PCOCC, "exec", "-n", f"yes {LINE} | head -c {MIB * 2**20}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"exec failed: {r.stderr.decode()}")
    return n * MIB / elapsed


def main():
    from pcocc.hypervisor import accel as accel_mod

    rows, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="pcocc-bench-exec-") as work:
        env, _rev, kernel, _initrd, _append = setup(work)
        accel = accel_mod.choose(tempfile.gettempdir(), kernel=kernel)
        for n in SIZES:
            r = subprocess.run([PCOCC, "batch", "-m", str(MEM_MB), "--wait", f"tiny:{n}"], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"pcocc batch failed: {r.stderr}")
            try:
                subprocess.run([PCOCC, "exec", "-n", "-w", "vm0", "true"], env=env, capture_output=True)  # warm the page cache
                first = [first_line(env, n) for _ in range(REPS)]
                stop = [ctrl_c(env, n) for _ in range(REPS)]
                rate = [throughput(env, n) for _ in range(max(1, REPS // 2))]
            finally:
                subprocess.run([PCOCC, "cancel"], env=env, capture_output=True)
            runs[n] = {"first_line_s": first, "ctrl_c_s": stop, "throughput_mib_s": rate}
            rows.append([n, f"{statistics.median(first):.2f}", f"{statistics.median(stop):.2f}", f"{statistics.median(rate):.1f}"])
            print(rows[-1], file=sys.stderr, flush=True)
    load = os.getloadavg()
    report.write("exec", f"Streamed pcocc exec (seconds and MiB/s, medians of {REPS} runs, accel {accel})",
                 ["VMs", "first line (s)", "Ctrl-C to prompt (s)", f"throughput, {MIB} MiB per VM (MiB/s, all VMs)"], rows,
                 {"goals": "first line <= 0.5 s, Ctrl-C to prompt <= 1 s (issue 14)",
                  "load average at the end": " ".join(f"{x:.1f}" for x in load),
                  "runs": json.dumps(runs)})


if __name__ == "__main__":
    main()
