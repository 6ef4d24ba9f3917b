"""`pcocc ckpt` and `pcocc batch -r` of one VM, against its memory size.

For each memory size, a 1-VM cluster boots; 3/8 of its memory is filled with
data that does not compress (8 MiB from /dev/urandom, repeated: farther apart
than zstd -1 looks) in a tmpfs, then `pcocc ckpt DIR` is timed (pause, disk delta, memory through
zstd, stop), and `pcocc batch -r DIR --wait` (start, memory read back, continue,
guest agent answering). A cold boot of the same VM is timed for reference.

Needs the tiny image (built on first use, cached). Run with the venv's python:
    .venv/bin/python bench/ckpt.py        (BENCH_MEMORY=256,512,1024 MiB, BENCH_REPS=2)
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import report
from boot import PCOCC, setup

MEMORY = [int(n) for n in os.environ.get("BENCH_MEMORY", "256,512,1024").split(",")]
REPS = int(os.environ.get("BENCH_REPS", "2"))


def pcocc(env, *argv):
    t0 = time.perf_counter()
    r = subprocess.run([PCOCC, *map(str, argv)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pcocc {' '.join(map(str, argv))} failed: {r.stderr}")
    return r.stdout, time.perf_counter() - t0


def fill(mem):
    return mem * 3 // 8 // 8 * 8  # MiB, in a tmpfs that may take half of the memory


def one(env, work, mem):
    ck = os.path.join(work, f"ck{mem}")
    out, boot = pcocc(env, "batch", "-m", mem, "--wait", "tiny:1")
    job = int(out)
    try:
        pcocc(env, "exec", "-j", job, f"head -c 8M /dev/urandom > /tmp/r; for i in $(seq {fill(mem) // 8}); do cat /tmp/r; done > /dev/shm/fill; rm /tmp/r")
        out, ckpt = pcocc(env, "ckpt", "-j", job, "--json", "-F", ck)
        size = json.loads(out)["bytes"]
        out, restart = pcocc(env, "batch", "-m", mem, "-r", ck, "--wait", "tiny:1")
        job = int(out)
        check, _ = pcocc(env, "exec", "-j", job, "wc -c < /dev/shm/fill")
        assert int(check) == fill(mem) * 2**20, check
    finally:
        subprocess.run([PCOCC, "cancel", "-j", str(job)], env=env, capture_output=True)
        shutil.rmtree(ck, ignore_errors=True)
    return {"boot": boot, "ckpt": ckpt, "restart": restart, "bytes": size}


def main():
    with tempfile.TemporaryDirectory(prefix="pcocc-bench-", dir=os.environ.get("BENCH_TMP")) as work:
        env, *_ = setup(work)
        rows, raw = [], {}
        for mem in MEMORY:
            runs = []
            for _ in range(REPS):
                runs.append(one(env, work, mem))
                print(f"{mem} MiB: {runs[-1]}", file=sys.stderr)
            raw[mem] = runs
            med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
            rows.append([mem, fill(mem), f"{med('ckpt'):.2f}", f"{med('restart'):.2f}", f"{med('boot'):.2f}", f"{med('bytes') / 2**20:.1f}"])
        report.write("ckpt", f"Checkpoint and restart of one VM (seconds, median of {REPS}, wall time of the commands)",
                     ["memory (MiB)", "filled (MiB)", "pcocc ckpt", "pcocc batch -r", "cold boot (batch)", "checkpoint size (MiB)"],
                     rows, {"runs": json.dumps(raw)})


if __name__ == "__main__":
    main()
