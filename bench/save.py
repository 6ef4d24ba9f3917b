"""`pcocc save` of a 10 MiB change, against the size of the image (goal: < 2 s, flat in image size).

For each image size, an image is made from the tiny one: the same file system
(about 90 MiB) plus P GiB of data written by qemu-io past its end, in a layer of
its own (so the image really holds that much, where a save that copied the
whole chain would show it). A cluster of REPS VMs starts from it; in each VM,
10 MiB of random data is written and synced, then `pcocc save` runs, timed from
the command's start to its end (the CLI's own start-up included), and the VM's
side reports its own time and how long the guest stayed frozen.

Needs the tiny image (built on first use, cached). Run with the venv's python:
    .venv/bin/python bench/save.py        (BENCH_PADDING=0,1,2,4 GiB, BENCH_REPS=3)
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

PADDING = [int(n) for n in os.environ.get("BENCH_PADDING", "0,1,2,4").split(",")]
REPS = int(os.environ.get("BENCH_REPS", "3"))
CHUNK = 256 * 2**20


def make_image(env, work, padding_gib):
    """user:bigP: tiny's file system plus P GiB of data after it; its total data in bytes."""
    from pcocc.config.models import Repo
    from pcocc.images import qemuimg
    from pcocc.images.store import ImageStore

    store = ImageStore([Repo("user", f"{work}/repo", "user")], "bench")
    name = f"big{padding_gib}"
    rev = store.copy("user:tiny", f"user:{name}")
    fs_size = rev.size
    if padding_gib:
        size = fs_size + padding_gib * 2**30
        rev = store.resize(f"user:{name}", size)

        def fill(path):
            qemuimg.create_layer(path, f"../blobs/{rev.layers[-1]}", size)
            for off in range(fs_size, size, CHUNK):
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x5a {off} {min(CHUNK, size - off)}", path],
                               check=True, stdout=subprocess.DEVNULL)

        rev = store.add_layer(rev, fill, size)
    with open(os.path.join(env["HOME"], ".pcocc", "templates.yaml"), "a") as f:
        f.write(f"{name}:\n  image: user:{name}\n")
    return name, rev.disk_usage(), rev.size


def pcocc(env, *argv):
    r = subprocess.run([PCOCC, *map(str, argv)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pcocc {' '.join(map(str, argv))} failed: {r.stderr}")
    return r.stdout


def bench_size(env, name):
    job = int(pcocc(env, "batch", "-m", "256", "--wait", f"{name}:{REPS}"))
    try:
        runs = []
        for rank in range(REPS):
            pcocc(env, "exec", "-j", job, "-w", f"vm{rank}", "dd if=/dev/urandom of=/root/change bs=1M count=10 conv=fsync 2>/dev/null")
            t0 = time.perf_counter()
            res = json.loads(pcocc(env, "save", "-j", job, "--json", f"vm{rank}"))
            runs.append({"wall": time.perf_counter() - t0, "vm_side": res["seconds"], "frozen": res.get("frozen_seconds"),
                         "layer": res["layer_bytes"], "uri": res["uri"]})
            print(f"{name} vm{rank}: {runs[-1]}", file=sys.stderr)
        return runs
    finally:
        subprocess.run([PCOCC, "cancel", "-j", str(job)], env=env, capture_output=True)


def main():
    with tempfile.TemporaryDirectory(prefix="pcocc-bench-", dir=os.environ.get("BENCH_TMP")) as work:
        env, *_ = setup(work)
        rows, raw = [], {}
        for padding in PADDING:
            name, data, vsize = make_image(env, work, padding)
            runs = bench_size(env, name)
            raw[name] = runs
            med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
            rows.append([f"{data / 2**30:.2f}", f"{vsize / 2**30:.1f}", f"{med('wall'):.2f}", f"{med('vm_side'):.3f}",
                         f"{med('frozen'):.3f}", f"{med('layer') / 2**20:.1f}"])
        report.write("save", f"pcocc save of a 10 MiB change (seconds, median of {REPS} VMs)",
                     ["image data (GiB)", "virtual size (GiB)", "pcocc save (wall)", "VM side", "guest frozen", "layer written (MiB)"],
                     rows, {"goal": "< 2 s, flat in image size", "runs": json.dumps(raw)})


if __name__ == "__main__":
    main()
