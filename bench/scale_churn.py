"""What the store keeps after many jobs came and went through the real node-setup code.

    .venv/bin/python bench/scale_churn.py [--jobs 1000] [--hosts 2] [--cap 300]

--jobs jobs, one after the other, each of --hosts simulated hosts x 16 VMs
(pcocc.testcluster.simhosts.simulate: the real `nodesetup.create`/`delete`, the launcher's
record, wait and end with its history record, the VMs' store writes as vmrun makes them)
on a 3-member etcd (pcocc.testcluster.etcd3). Before the first and after the last, the
store is compacted and defragmented as an administrator does (etcd.io/docs/v3.4/op-guide/
maintenance), then counted (after half the jobs too): keys in all, of them the history's (pcocc history: one record
per ended cluster, at most history.MAX_ENTRIES per user) and the id pools', and the
database size. Also: etcd requests per VM (set-up and teardown), and every job's checks
(simhosts: no id taken twice, each host's objects exactly its undo log's, nothing left).

The claim it tests: nothing grows with the jobs that came and went but the bounded history.

Results: bench/results/scale_churn.md and .json (the table), scale_churn_run.json (the raw figures). Everything started (etcd members, worker
processes) is stopped by pid, also on failure or Ctrl-C.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

VMS = 16


def measure(cluster):
    """{keys, history_keys, pool_keys, db_bytes} after a compaction and defragmentation."""
    from pcocc.store.etcd import EtcdStore

    status = cluster.compact_and_defrag()
    admin = EtcdStore(cluster.endpoints)
    try:
        keys = admin.range("/")
        history = [k for k in keys if "/history/" in k]
        pools = [k for k in keys if k.startswith(("/pcocc/global/pools/", "/pcocc/global/pool-owners/"))]
        return {"keys": len(keys), "history_keys": len(history), "pool_keys": len(pools),
                "other_keys": sorted(set(keys) - set(history) - set(pools))[:20],
                "db_bytes": max(m["db_bytes"] for m in status)}
    finally:
        admin.close()


def churn(cluster, jobs, hosts, cap):
    from pcocc.testcluster.simhosts import simulate

    before, middle = measure(cluster), None
    print(f"before: {before}", flush=True)
    problems, requests, t0 = [], 0, time.perf_counter()
    for n in range(jobs):
        base = tempfile.mkdtemp(prefix="churn-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            r = simulate(cluster.endpoints, base, hosts, workers=1, jobid=100_000 + n, cap=cap)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        requests += r["requests"]
        problems += [f"job {100_000 + n}: {p}" for p in r["problems"]]
        if n + 1 == jobs // 2:
            middle = measure(cluster)
            print(f"after {n + 1} jobs: {middle}", flush=True)
        if (n + 1) % 50 == 0 or r["problems"]:
            print(f"{n + 1}/{jobs} jobs, {time.perf_counter() - t0:.0f} s, {len(problems)} problems"
                  f"{': ' + r['problems'][0][:200] if r['problems'] else ''}", flush=True)
    seconds = time.perf_counter() - t0
    after = measure(cluster)
    print(f"after: {after}", flush=True)
    return {"jobs": jobs, "hosts": hosts, "vms": jobs * hosts * VMS, "seconds": seconds, "problems": problems,
            "requests_per_vm": requests / (jobs * hosts * VMS), "before": before, "middle": middle or before, "after": after}


def write(out, r):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scale_churn_run.json"), "w") as f:  # the raw figures
        json.dump({**r, "problems": r["problems"][:20], "problem_count": len(r["problems"])}, f, indent=1)
    b, m, a = r["before"], r["middle"], r["after"]
    rows = [[what, b[key], m[key], a[key], a[key] - m[key]] for what, key in (
        ("keys", "keys"), ("of which history records", "history_keys"), ("of which id pool keys", "pool_keys"))]
    rows.append(["database MiB", *(f"{x['db_bytes'] / 2**20:.2f}" for x in (b, m, a)),
                 f"{(a['db_bytes'] - m['db_bytes']) / 2**20:+.2f}"])
    notes = {
        "run": f"{r['jobs']} jobs of {r['hosts']} simulated hosts x {VMS} VMs ({r['vms']} VMs in all), one after the "
               f"other, in {r['seconds']:.0f} s; {len(r['problems'])} problems found by the checks; "
               f"{r['requests_per_vm']:.2f} etcd requests per VM (set-up and teardown)",
        "setup": "3-member etcd (pcocc.testcluster.etcd3) on this 2-core host; each job through "
                 "pcocc.testcluster.simhosts.simulate (real node setup, launcher record, wait and end; a recording fake "
                 "of the host's tools); 'before' and 'after' are counted after a compaction and a defragmentation",
        "other keys": ", ".join(a["other_keys"]) or "none",
        "reading": "the history keeps one record per ended cluster, at most pcocc.history.MAX_ENTRIES (1,000) per user and "
                   "7 days: it is the only part that may grow, up to that bound; the database size after a "
                   "defragmentation is what the keys left take",
    }
    if r["problems"]:
        notes["problems"] = "; ".join(r["problems"][:5])
    report.RESULTS = out
    report.write("scale_churn", "The store after many jobs came and went through the real node-setup code",
                 ["", "before", f"after {r['jobs'] // 2} jobs", f"after {r['jobs']} jobs", "change in the second half"],
                 rows, extra=notes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=2, help="simulated hosts per job (16 VMs each)")
    ap.add_argument("--cap", type=float, default=300, help="seconds a job's phase may take")
    ap.add_argument("--out", default=report.RESULTS)
    args = ap.parse_args()
    from pcocc.testcluster.etcd3 import Etcd3

    etcd_dir = tempfile.mkdtemp(prefix="scale-churn-etcd-")
    try:
        with Etcd3(etcd_dir) as cluster:
            r = churn(cluster, args.jobs, args.hosts, args.cap)
        write(args.out, r)
    finally:
        shutil.rmtree(etcd_dir, ignore_errors=True)  # the members are stopped (by pid) first, on leaving Etcd3
    return 1 if r["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
