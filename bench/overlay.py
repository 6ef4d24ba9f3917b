"""Per-VM ephemeral disk creation: 64 overlays on a 1 GiB and a 20 GiB (sparse) image.

Goal: under 1 s for 64, flat in image size. Compares pcocc's in-process qcow2
writer with `qemu-img create` for reference, in the same run.
"""

import os
import subprocess
import sys
import tempfile
import time

import report

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from pcocc.images import qcow2  # noqa: E402

N = 64


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("1 GiB", 2**30), ("20 GiB", 20 * 2**30)):
            base = os.path.join(tmp, f"base-{size}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], check=True)
            t0 = time.perf_counter()
            for i in range(N):
                qcow2.create_overlay(os.path.join(tmp, f"ov-{size}-{i}.qcow2"), base, size)
            ours = time.perf_counter() - t0
            subprocess.run(["qemu-img", "check", "-q", os.path.join(tmp, f"ov-{size}-0.qcow2")], check=True)
            t0 = time.perf_counter()
            for i in range(N):
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, os.path.join(tmp, f"qi-{size}-{i}.qcow2")], check=True)
            theirs = time.perf_counter() - t0
            rows.append([label, N, f"{ours:.4f}", f"{theirs:.3f}", f"{theirs / ours:.0f}x"])
    report.write("overlay", "Creating 64 ephemeral overlays (seconds for all 64)", ["image size", "overlays", "pcocc", "qemu-img create", "speed-up"], rows, {"goal": "< 1 s for 64, flat in image size"})


if __name__ == "__main__":
    main()
