"""Cluster state set-up at scale through the real node-setup code, on a 3-member etcd.

    .venv/bin/python bench/scale_setup.py [--hosts 10,100,1000] [--reps 3] [--workers 0] [--cap 600]

One job of H simulated hosts x 16 VMs (pcocc.testcluster.simhosts): every host runs
`nodesetup.create` (the cluster's record awaited, its plan, the job's VXLAN id, 16 external
addresses and 16 reverse-NAT ports allocated in the store, its tunnel endpoint published and
the peers' awaited, every host object recorded in the undo log then made by a RecordingFake
of the host's tools, its state published), then its 16 VMs' store writes as vmrun makes them
(the cluster's record and CA read, starting -> qemu-start -> booting -> running); the
launcher writes the cluster's record (`SlurmBackend.cluster_info`, credentials) and waits for
every VM (`launcher.wait_started`). Then the VMs end, the launcher deletes the cluster's
keys and every host runs `nodesetup.delete`.

Figures per size, each the median of --reps runs (a size whose runs fail is run once):
set-up wall time (from the start signal until the launcher sees every VM running), per VM,
growth against the previous size; a node's set-up (median, slowest) and its CPU time; the
VMs' start CPU time per VM; the cluster record's size; etcd requests per VM (set-up and
teardown); the teardown; and the checks (simhosts: ids, rank map, each host's objects
exactly its undo log's, nothing left after the teardown). Absolute times are this
machine's: 2 cores shared by the 3 etcd members, the simulated hosts and other suites.

Results: bench/results/scale_setup.md, .json and .png (bench/plot.py). Everything started
(etcd members, worker processes) is stopped by pid, also on failure or Ctrl-C.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

VMS = 16


def median(runs, key):
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def one_size(endpoints, hosts, reps, workers, cap):
    from pcocc.testcluster.simhosts import simulate

    runs = []
    for rep in range(reps):
        base = tempfile.mkdtemp(prefix=f"simhosts-{hosts}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            r = simulate(endpoints, base, hosts, workers=workers or None, cap=cap)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        runs.append(r)
        print(f"{hosts} hosts, run {rep + 1}: set-up {r.get('setup_s', 0):.2f} s, teardown {r.get('teardown_s', 0) or 0:.2f} s, "
              f"{len(r['problems'])} problems{': ' + r['problems'][0][:300] if r['problems'] else ''}", flush=True)
        if r["problems"]:
            break  # a failing size is run once
    return runs


def row(hosts, runs, prev):
    ok = [r for r in runs if not r["problems"]]
    use = ok or runs
    vms = hosts * VMS
    setup = median(use, "setup_s")
    per_vm = setup / vms * 1000 if setup else None
    growth = "-"
    if prev and ok and per_vm:
        p_hosts, p_setup, p_vm = prev
        growth = f"x{setup / p_setup:.1f} total, x{per_vm / p_vm:.2f} per VM (hosts x{hosts / p_hosts:g})"
    fail = next((r.get("launcher_error") or r["problems"][0] for r in runs if r["problems"]), "")
    return [
        hosts, vms, f"{len(ok)}/{len(runs)}",
        round(setup, 2) if ok else f"failed: {fail[:160]}",
        round(per_vm, 3) if ok else "",
        growth,
        round(median(use, "median_setup_s"), 2) if ok else "",
        round(median(use, "slowest_setup_s"), 2) if ok else "",
        round(median(use, "median_wait_s"), 2) if ok else "",
        round(statistics.median(r["setup_cpu_s"] / hosts for r in use) * 1000) if ok else "",
        round(statistics.median(r["vms_cpu_s"] / vms for r in use) * 1000, 2) if ok else "",
        round(median(use, "record_bytes") / 2**20, 2) if median(use, "record_bytes") else "",
        round(statistics.median(r["requests"] / vms for r in use), 1),
        round(median(use, "teardown_s"), 2) if median(use, "teardown_s") else "",
        int(median(use, "objects") or 0), int(median(use, "commands") or 0),
        sum(r.get("problem_count", len(r["problems"])) for r in runs), sum(r.get("teardown_problems", 0) for r in runs),
        round(statistics.median(r.get("loadavg", [0])[0] for r in use), 1),
    ], ((hosts, setup, per_vm) if ok else prev)


HEADERS = ["hosts", "VMs", "runs without problem", "set-up s (median)", "ms per VM", "growth vs previous size",
           "node set-up s (median)", "node set-up s (slowest)", "node wait for record and peers s (median)",
           "node set-up CPU ms per host", "VM start CPU ms per VM", "cluster record MiB", "etcd requests per VM",
           "teardown s", "host objects checked", "commands faked", "problems", "of which left after the teardown",
           "load average at start"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", default="10,100,1000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: 1 per 25 hosts, at most 4)")
    ap.add_argument("--cap", type=float, default=600, help="seconds a phase may take")
    ap.add_argument("--out", default=report.RESULTS)
    ap.add_argument("--merge", action="store_true", help="keep the runs of other sizes from the last results")
    ap.add_argument("--append", action="store_true", help="with --merge: keep the last results' runs of these sizes too")
    ap.add_argument("--render", action="store_true", help="write the table and plot again from the last results, run nothing")
    args = ap.parse_args()
    from pcocc.testcluster.etcd3 import Etcd3

    report.RESULTS = args.out
    sizes = [int(h) for h in args.hosts.split(",")]
    kept = {}
    if args.merge:
        with open(os.path.join(args.out, "scale_setup_runs.json")) as f:
            kept = {int(h): runs for h, runs in json.load(f).items() if int(h) not in sizes or args.append}
    if args.render:
        with open(os.path.join(args.out, "scale_setup_runs.json")) as f:
            kept = {int(h): runs for h, runs in json.load(f).items()}
        write_all(kept, args)
        return 0
    etcd_dir = tempfile.mkdtemp(prefix="scale-setup-etcd-")
    try:
        run_sizes(Etcd3, etcd_dir, sizes, kept, args)
    finally:
        shutil.rmtree(etcd_dir, ignore_errors=True)  # the members are stopped (by pid) first, on leaving Etcd3
    return 0


def run_sizes(Etcd3, etcd_dir, sizes, kept, args):
    with Etcd3(etcd_dir) as cluster:
        for hosts in sizes:
            kept[hosts] = kept.get(hosts, []) + one_size(cluster.endpoints, hosts, args.reps, args.workers, args.cap)
            write_all(kept, args)  # after each size: a cut run keeps what it measured


def write_all(kept, args):
    """The table and figure of every size kept ({hosts: [runs]}), growth against the size before."""
    results, rows, prev = [], [], None
    for h in sorted(kept):
        results.append({"hosts": h, "runs": kept[h]})
        r, prev = row(h, kept[h], prev)
        rows.append(r)
    write(rows, results, args)


def write(rows, results, args):
    notes = {
        "setup": "3-member etcd (pcocc.testcluster.etcd3, --max-request-bytes at etcd's default 1.5 MiB) on this 2-core host; "
                 "the simulated hosts run as one thread each in worker processes (pcocc.testcluster.simhosts), node state dirs "
                 "on tmpfs (as /var/run); one L3 ethernet network with reverse NAT; the fake answers ip, ovs-vsctl, iptables, "
                 "dnsmasq, sysctl, squeue and scontrol; the VMs' store writes are vmrun's, reproduced (its publish is a closure)",
        "before": "the same harness before the store-layout work of issue 15 (commit b0998c2, load average 6-14): 10 hosts "
                  "2.98 s (18.6 ms per VM, node set-up CPU 118 ms per host, VM start CPU 3.93 ms per VM, record 0.08 MiB); "
                  "100 hosts 74.4 s (46.5 ms per VM, x2.50 per VM; 337 ms and 37.6 ms; record 0.81 MiB); 150 hosts failed on "
                  "etcd timeouts; 1,000 hosts failed at once: its 7.7 MB cluster record was over etcd's 1.5 MiB request limit",
        "changes": "since: the cluster record names each template's settings once and the ranks as runs (935 bytes at "
                   "16,000 VMs); the launcher's wait, the VMs' and the nodes' waits follow the store's watch (the prefix read "
                   "once, then only its changes); the undo log appends one line per record; a node's VXLAN mesh is made in "
                   "a few ovs-vsctl calls",
        "load": "these runs (2026-11-30 17:00-17:07, after the peers' endpoints moved to keys of their own) on a quiet "
                "machine: load average 1.5-3.8 at the start of each (last column). 1,000 hosts still fails: with 1,000 "
                "clients of its 3 members on these 2 cores, etcd left a node's request unanswered for 10 s (each member "
                "tried in turn); nothing was left after the teardown. The earlier runs (13:47-13:59, load 14-107) had 300 "
                "hosts pass in 226 s",
        "reading": "on 2 cores every host's CPU adds up: the wall time is the sum of all hosts' node-local work (which real "
                   "nodes do in parallel) plus etcd's; 'node set-up CPU per host' and 'VM start CPU per VM' are that "
                   "node-local work: a figure that grows with the cluster means a node's own work grows with it",
    }
    import json

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale_setup_runs.json"), "w") as f:  # every run's figures
        json.dump({str(r["hosts"]): [{k: v for k, v in run.items() if k not in ("problems", "errors")}
                                     | {"problems": run["problems"][:5], "errors": run.get("errors", [])[:20],
                                        "problem_count": run.get("problem_count", len(run["problems"]))}
                                     for run in r["runs"]] for r in results}, f, indent=1)
    report.write("scale_setup", "Cluster state set-up through the real node-setup code (simulated hosts x 16 VMs, 3-member etcd)",
                 HEADERS, rows, extra=notes)
    plot(results, os.path.join(args.out, "scale_setup.png"))  # in place of plot.py's one-bar-per-column figure


def plot(results, path):
    """Four panels against the number of hosts (log scales): set-up wall time; per VM; a node's
    own CPU (node set-up per host, VM start per VM); the cluster record's size against etcd's limit."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    ok = [(r["hosts"], [x for x in r["runs"] if not x["problems"]]) for r in results]
    ok = [(h, runs) for h, runs in ok if runs]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    xs = [h for h, _ in ok]
    setup = [median(runs, "setup_s") for _, runs in ok]
    axes[0].plot(xs, setup, "s-", label="set-up (until the launcher sees every VM running)")
    axes[0].plot(xs, [median(runs, "slowest_setup_s") for _, runs in ok], "o--", label="slowest node's set-up")
    axes[1].plot(xs, [s / (h * VMS) * 1000 for h, s in zip(xs, setup)], "s-", label="set-up ms per VM")
    axes[2].plot(xs, [statistics.median(x["setup_cpu_s"] / h for x in runs) * 1000 for h, runs in ok], "s-",
                 label="node set-up CPU ms per host")
    axes[2].plot(xs, [statistics.median(x["vms_cpu_s"] / (h * VMS) for x in runs) * 1000 for h, runs in ok], "o--",
                 label="VM start CPU ms per VM")
    rec = [(r["hosts"], median(r["runs"], "record_bytes")) for r in results if median(r["runs"], "record_bytes")]
    axes[3].plot([h for h, _ in rec], [b / 2**20 for _, b in rec], "s-", label="cluster record (MiB)")
    axes[3].axhline(1.5, color="red", linestyle=":", label="etcd's request limit (1.5 MiB)")
    for h, runs in ((r["hosts"], r["runs"]) for r in results):
        if all(x["problems"] for x in runs):
            axes[0].annotate(f"{h} hosts: failed", (xs[-1] if xs else 1, setup[-1] if setup else 1),
                             textcoords="offset points", xytext=(-90, -30), fontsize=8)
    titles = ("set-up wall time (s)", "set-up per VM (ms)", "a node's own CPU (ms)", "cluster record")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("hosts (16 VMs each)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Cluster state set-up through the real node-setup code, simulated hosts, 3-member etcd (median of runs; 2-core host)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
