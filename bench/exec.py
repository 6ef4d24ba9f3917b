"""Streamed `pcocc exec` on 1 and 4 VMs: first-line latency, Ctrl-C to prompt, throughput.

first line: from starting `pcocc exec -n 'echo first; sleep 1; echo second'` (the CLI's own
start included, as a user sees it) to its first line on our end of its stdout (with 4 VMs:
the first line of the last VM to print one); runs BENCH_PAUSE seconds apart (a person typing
the next command), and also back to back (a shell loop), and once right after `batch --wait`
(the VMs' first exec). Ctrl-C: from SIGINT to the CLI, sent once every
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
PAUSE = float(os.environ.get("BENCH_PAUSE", "1"))
# first line, Ctrl-C (s): this bench before the spare runner was claimed ahead and the agent's
# calls pipelined (30fbac6, 12:43 on 2026-11-30, load 9-10); and before the runners started ahead (7775715, load 11-14)
BEFORE = {1: (0.88, 0.72), 4: (1.41, 1.28)}
FIRST_BEFORE = {1: (1.32, 0.73), 4: (4.74, 2.49)}
GOALS = (0.5, 1.0)  # first line, Ctrl-C to prompt (s), issue 14
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
                after_start = first_line(env, n)  # the VMs' first exec, right after batch --wait
                first, loop = [], []
                for _ in range(REPS):  # alternated, so that the host's noise hits both alike
                    time.sleep(PAUSE)
                    first.append(first_line(env, n))
                    loop.append(first_line(env, n))
                stop = []
                for _ in range(REPS):
                    time.sleep(PAUSE)
                    stop.append(ctrl_c(env, n))
                rate = [throughput(env, n) for _ in range(max(1, REPS // 2))]
            finally:
                subprocess.run([PCOCC, "cancel"], env=env, capture_output=True)
            runs[n] = {"first_line_s": first, "first_line_back_to_back_s": loop, "first_line_after_start_s": after_start,
                       "ctrl_c_s": stop, "throughput_mib_s": rate, "load_average": os.getloadavg()[0]}
            f, c = statistics.median(first), statistics.median(stop)
            rows.append([n, f"{f:.2f}", f"{f / GOALS[0]:.2f}x", f"{BEFORE[n][0] / f:.1f}x", f"{statistics.median(loop):.2f}",
                         f"{after_start:.2f}", f"{c:.2f}", f"{c / GOALS[1]:.2f}x", f"{BEFORE[n][1] / c:.1f}x",
                         f"{statistics.median(rate):.1f}", f"{runs[n]['load_average']:.1f}"])
            print(rows[-1], file=sys.stderr, flush=True)
    load = os.getloadavg()
    report.write("exec", f"Streamed pcocc exec (seconds and MiB/s, medians of {REPS} runs, accel {accel})",
                 ["VMs", f"first line, runs {PAUSE:g} s apart (s)", "/ goal", "before / now", "first line, back to back (s)",
                  "first line, first exec after start (s)", "Ctrl-C to prompt (s)", "/ goal", "before / now",
                  f"throughput, {MIB} MiB per VM (MiB/s, all VMs)", "load average (1 min)"], rows,
                 {"goals": "first line <= 0.5 s, Ctrl-C to prompt <= 1 s (issue 14)",
                  "before": "medians of the same bench before the spare runner was claimed ahead and the agent's calls "
                            "pipelined (30fbac6, load 9-10): "
                            + ", ".join(f"{n} VM(s): first line {b[0]} s, Ctrl-C {b[1]} s" for n, b in BEFORE.items())
                            + "; before the runners started ahead (7775715, load 11-14): "
                            + ", ".join(f"{n} VM(s): first line {b[0]} s, Ctrl-C {b[1]} s" for n, b in FIRST_BEFORE.items()),
                  "load average at the end": " ".join(f"{x:.1f}" for x in load),
                  "runs": json.dumps(runs)})


if __name__ == "__main__":
    main()
