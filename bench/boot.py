"""Time from `pcocc batch tiny:N` to every guest agent answering, against raw qemu.

Raw: N qemu-system-x86_64 started by hand with the same image (an overlay on the
same layer), kernel, seed and accelerator, timed from their start to every
guest agent answering guest-ping. pcocc: `pcocc batch --wait tiny:N`, which
returns once every VM's agent answered, then `pcocc cancel`. Runs alternate
so that machine noise hits both alike. Goal: pcocc / raw <= 1.10.

Needs the tiny image (built on first use, cached). Run with the venv's python.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import report

HERE = os.path.dirname(os.path.abspath(__file__))
PCOCC = os.path.join(os.path.dirname(sys.executable), "pcocc")
REPS = int(os.environ.get("BENCH_REPS", "2"))
SIZES = [int(n) for n in os.environ.get("BENCH_SIZES", "1,2,3,4").split(",")]
MEM_MB = 256


def setup(work):
    from pcocc.config.models import Repo
    from pcocc.images.build import build_image
    from pcocc.images.store import ImageStore

    image = build_image("tiny", cache_dir=os.path.expanduser("~/.cache/pcocc/images"), log=lambda l: print(l, file=sys.stderr))
    home = os.path.join(work, "home")
    os.makedirs(os.path.join(home, ".pcocc"))
    with open(os.path.join(home, ".pcocc", "repos.yaml"), "w") as f:
        f.write(f"repos:\n  - name: user\n    path: {work}/repo\n")
    with open(os.path.join(home, ".pcocc", "templates.yaml"), "w") as f:
        f.write("tiny:\n  image: user:tiny\n")
    kernel = str(image.vmlinux or image.kernel)
    store = ImageStore([Repo("user", f"{work}/repo", "user")], "bench")
    rev = store.import_(str(image.disk), "tiny", "qcow2", boot={"kernel": kernel, "initrd": str(image.initrd), "append": image.append})
    env = dict(os.environ, HOME=home, PCOCC_SYSTEM_CONF_DIR=os.path.join(work, "etc"), PCOCC_RUN_DIR=os.path.join(work, "run"))
    return env, rev, kernel, str(image.initrd), image.append


def run_pcocc(env, n):
    t0 = time.perf_counter()
    try:
        r = subprocess.run([PCOCC, "batch", "-m", str(MEM_MB), "--wait", f"tiny:{n}"], env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"pcocc batch failed: {r.stderr}")
    finally:  # also when interrupted: leave no cluster behind
        subprocess.run([PCOCC, "cancel"], env=env, capture_output=True)
    return elapsed


def run_raw(work, rev, kernel, initrd, append, accel, n):
    from pcocc.agent.qga import GuestAgent
    from pcocc.hypervisor import seed
    from pcocc.images.store import create_overlay

    procs, dirs = [], []
    for i in range(n):  # what a user prepares before starting qemu by hand (not timed)
        d = tempfile.mkdtemp(dir=work)
        create_overlay(rev, os.path.join(d, "disk.qcow2"))
        meta, user = seed.render(f"vm{i}", f"raw-{i}")
        seed.write_iso(os.path.join(d, "seed.iso"), meta, user, d)
        dirs.append(d)
    t0 = time.perf_counter()
    for i, d in enumerate(dirs):
        argv = ["qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", f"{MEM_MB}M", "-smp", "1", "-nodefaults", "-display", "none",
                "-kernel", kernel, "-initrd", initrd, "-append", append, "-serial", f"file:{d}/console.log",
                "-drive", f"file={d}/disk.qcow2,if=virtio,format=qcow2,cache=unsafe", "-drive", f"file={d}/seed.iso,if=virtio,format=raw,readonly=on",
                "-device", "virtio-serial-pci", "-chardev", f"socket,id=qga0,path={d}/qga.sock,server=on,wait=off",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait_agent(d):
        with GuestAgent(os.path.join(d, "qga.sock"), timeout=5) as agent:
            agent.connect(timeout=300)
            agent.ping()

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(wait_agent, dirs))
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.kill()
        p.wait()
    return elapsed


def main():
    from pcocc.hypervisor import accel as accel_mod

    with tempfile.TemporaryDirectory(prefix="pcocc-bench-") as work:
        env, rev, kernel, initrd, append = setup(work)
        accel = accel_mod.choose(tempfile.gettempdir(), kernel=kernel)
        rows, raw_all, ours_all = [], {}, {}
        for n in SIZES:
            raw, ours = [], []
            for _ in range(REPS):
                raw.append(run_raw(work, rev, kernel, initrd, append, accel, n))
                ours.append(run_pcocc(env, n))
                print(f"N={n}: raw {raw[-1]:.2f} s, pcocc {ours[-1]:.2f} s", file=sys.stderr)
            r, o = statistics.median(raw), statistics.median(ours)
            raw_all[n], ours_all[n] = raw, ours
            rows.append([n, f"{r:.2f}", f"{o:.2f}", f"{o / r:.2f}"])
        report.write("boot", f"Start to every guest agent answering (seconds, median of {REPS}, accel {accel})",
                     ["VMs", "raw qemu", "pcocc batch", "ratio"], rows,
                     {"goal": "ratio <= 1.10", "accelerator": accel, "raw_runs": json.dumps(raw_all), "pcocc_runs": json.dumps(ours_all)})


if __name__ == "__main__":
    main()
