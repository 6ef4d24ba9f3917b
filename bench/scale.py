"""Id allocation at cluster scale on a 3-member etcd: the former single-key pools against one key per id.

    .venv/bin/python bench/scale.py [--hosts 10,100,1000] [--reps 3] [--workers 8x16] [--cap 150] [--designs old,new]

A virtual cluster of H hosts x 16 VMs asks the store for what the real node setup asks
(src/pcocc/networks/ethernet.py and gateway.py, an L3 network with reverse NAT):
every host allocates the job's VXLAN id (owner "JOB:net", shared by the job's hosts),
16 external addresses from the network's /16 (owner "JOB:net:HOST") and 16 reverse-NAT
host ports from its own pool of 100 (hostport-HOST), with `alive` given as node setup
gives it. Every host does so at once: the hosts are spread over W concurrent clients
(P processes x T threads, each thread its own etcd connection, to a member picked at
random as pcocc's client does). Then the teardown: each host releases its addresses and
ports, and one host per job the VXLAN id (the last node out, jobnet.release_pool).

Figures per (design, hosts), each the median of --reps runs (absolute times are this
machine's: 2 cores shared with the 3 etcd members and the clients):
- set-up: wall time from the start signal until every host has its ids; per VM;
  growth ratios against the previous size (total and per VM: flat per VM means linear);
- etcd requests per VM (every HTTP request the clients send, retries included);
- errors (e.g. "too much contention"), hosts not done within --cap seconds of a phase;
- checks: no id twice (addresses over the cluster, ports per host, one VXLAN id per
  job, none shared between jobs), and after the teardown, keys left in the pools.
A last case, "32 jobs x 32 hosts", sets up 32 jobs of 32 hosts at once.

"old" is the former allocator (one key per pool holding {id: owner}, compare-and-swap
retried up to 100 times), kept below as it was in git (commit 982d346) so that the bench
measures it on the same etcd. A phase that does not finish within --cap seconds is cut
(the hosts left are counted); the former design is run once at sizes above 100 hosts.

Results: bench/results/scale.md, scale.json and scale.png. Everything started (etcd
members, client processes) is stopped by pid, also on failure or Ctrl-C.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

VMS = 16  # per host
VNI = ("vxlan", 1000, 16_000_000)  # ethernet.VNI_POOL
EXT = ("extip-net", 1, 65534)  # a /16 ext-network (gateway.Addressing.ext_pool)
PORTS = (40000, 40099)  # reverse-nat min/max-host-port: 100 per host


# --------------------------------------------------------------------------- the former design
class OldPool:
    """The former allocator (src/pcocc/allocator.py at 982d346): one key holds {id: owner}."""

    def __init__(self, store, name, first, last):
        self.store, self.name, self.first, self.last = store, name, first, last
        self.key = f"/pcocc/global/pools/{name}"

    def allocate(self, owner, count=1, alive=None):
        from pcocc.errors import ResourceError

        owner = str(owner)
        got = []

        def take(current):
            table = {int(k): v for k, v in (current or {}).items()}
            if alive is not None:
                table = {i: o for i, o in table.items() if o == owner or alive(o)}
            mine = sorted(i for i, o in table.items() if o == owner)
            need = count - len(mine)
            if need > 0:
                free = (i for i in range(self.first, self.last + 1) if i not in table)
                new = [i for _, i in zip(range(need), free)]
                if len(new) < need:
                    raise ResourceError(f"no free {self.name} left")
                table.update((i, owner) for i in new)
                mine += new
            got[:] = mine[:count]
            return {str(i): o for i, o in sorted(table.items())}

        self.store.update(self.key, take)
        return got

    def release(self, owner):
        owner = str(owner)
        self.store.update(self.key, lambda cur: {k: o for k, o in (cur or {}).items() if o != owner} or None)


# --------------------------------------------------------------------------- one client process
def _client(slot0, threads, slots, endpoints, design, tasks, cap, go, go_down, out):
    """One process: `threads` threads, thread k serving the tasks i with i % slots == slot0 + k."""
    from pcocc.allocator import Pool
    from pcocc.store.etcd import EtcdStore

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    from pcocc.testcluster.simhosts import count_requests  # every request to etcd, retries included

    requests = count_requests()
    cls = Pool if design == "new" else OldPool
    alive = lambda owner: True  # noqa: E731 - every job of the bench runs
    got, errors, undone, lock = {}, [], [0, 0], threading.Lock()
    at_up = [0]  # requests sent when this process's last thread finished its set-ups

    def setup(store, job, host):
        owner = f"{job}:net:h{host}"
        vni = cls(store, *VNI).allocate(f"{job}:net", alive=alive)
        ext = cls(store, *EXT).allocate(owner, VMS, alive=alive)
        ports = cls(store, f"hostport-h{host}", *PORTS).allocate(owner, VMS, alive=alive)
        return vni, ext, ports

    def teardown(store, job, host, first_of_job):
        owner = f"{job}:net:h{host}"
        cls(store, EXT[0], 0, 0).release(owner)
        cls(store, f"hostport-h{host}", 0, 0).release(owner)
        if first_of_job:
            cls(store, VNI[0], 0, 0).release(f"{job}:net")

    def thread(k):
        store = EtcdStore(endpoints)
        mine = [t for i, t in enumerate(tasks) if i % slots == slot0 + k]
        go.wait()
        deadline = time.monotonic() + cap
        for job, host, _first in mine:
            if time.monotonic() > deadline:
                with lock:
                    undone[0] += 1
                continue
            try:
                r = setup(store, job, host)
                with lock:
                    got[(job, host)] = r
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"setup {job}/{host}: {type(exc).__name__}: {str(exc)[:120]}")
        with lock:
            at_up[0] = requests["n"]
        out.put(("up", slot0 + k, None))
        go_down.wait()
        deadline = time.monotonic() + cap
        for job, host, first in mine:
            if (job, host) not in got:
                continue
            if time.monotonic() > deadline:
                with lock:
                    undone[1] += 1
                continue
            try:
                teardown(store, job, host, first)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(f"teardown {job}/{host}: {type(exc).__name__}: {str(exc)[:120]}")
        store.close()

    ts = [threading.Thread(target=thread, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(("done", slot0, {"got": {f"{j}/{h}": v for (j, h), v in got.items()}, "errors": errors,
                             "undone": undone, "requests": at_up[0], "requests_down": requests["n"] - at_up[0]}))


# --------------------------------------------------------------------------- one run
class Run:
    def __init__(self, endpoints, procs, threads, cap):
        self.endpoints, self.procs, self.threads, self.cap = endpoints, procs, threads, cap
        self.ctx = multiprocessing.get_context("fork")  # the parent has no threads when it forks

    def once(self, design, jobs, hosts_per_job, clean=True, job_base=100):
        """Set up then tear down `jobs` jobs of `hosts_per_job` hosts at once; the figures.
        clean: first delete every pool key (so that runs are independent)."""
        from pcocc.store.etcd import EtcdStore

        admin = EtcdStore(self.endpoints)
        if clean:
            for prefix in ("/pcocc/global/pools/", "/pcocc/global/pool-owners/"):
                admin.delete_prefix(prefix)
        tasks = [(job_base + j, j * hosts_per_job + h, h == 0) for h in range(hosts_per_job) for j in range(jobs)]
        procs = min(self.procs, len(tasks))
        threads = max(1, min(self.threads, len(tasks) // procs))
        slots = procs * threads
        go, go_down, out = self.ctx.Event(), self.ctx.Event(), self.ctx.Queue()
        children = [self.ctx.Process(target=_client, args=(p * threads, threads, slots, self.endpoints, design,
                                                           tasks, self.cap, go, go_down, out)) for p in range(procs)]
        for c in children:
            c.start()
        try:
            time.sleep(0.5)  # let the children open their connections: the clock starts at `go`
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            go.set()
            ups = 0
            while ups < slots:
                kind, _, _ = self._get(out, children)
                ups += kind == "up"
            t_up = time.perf_counter() - t0
            size = admin.client.call("maintenance/status", {})["dbSize"]
            keys = int(admin.client.call("kv/range", {"key": "AA==", "range_end": "AA==", "count_only": True}).get("count", 0))
            t1 = time.perf_counter()
            go_down.set()
            reports = []
            while len(reports) < procs:
                kind, _, data = self._get(out, children)
                if kind == "done":
                    reports.append(data)
            t_down = time.perf_counter() - t1
        finally:
            go.set()
            go_down.set()
            from pcocc.testcluster.simhosts import stop_workers

            stop_workers(children, out)
        got = {k: v for r in reports for k, v in r["got"].items()}
        left = len(admin.range("/pcocc/global/pools/")) + len(admin.range("/pcocc/global/pool-owners/"))
        admin.close()
        vms = jobs * hosts_per_job * VMS
        return {
            "setup_s": t_up, "teardown_s": t_down, "vms": vms, "hosts": jobs * hosts_per_job, "jobs": jobs,
            "clients": slots, "requests": sum(r["requests"] for r in reports),
            "requests_down": sum(r["requests_down"] for r in reports),
            "errors": [e for r in reports for e in r["errors"]],
            "not_done": [sum(r["undone"][0] for r in reports), sum(r["undone"][1] for r in reports)],
            "duplicates": duplicates(got, hosts_per_job), "hosts_done": len(got), "keys_left": left,
            "keys_at_peak": keys, "db_bytes_at_peak": int(size), "loadavg": [load0, os.getloadavg()[0]],
        }

    @staticmethod
    def _get(q, children):
        import queue

        while True:
            try:
                return q.get(timeout=1)
            except queue.Empty:
                if not any(c.is_alive() for c in children):
                    raise SystemExit("every client process ended early") from None


def duplicates(got, hosts_per_job):
    """How many ids are given twice: addresses over the cluster, ports per host, VXLAN ids
    between jobs, and hosts of a job that disagree on its VXLAN id."""
    ext = [i for vni, e, p in got.values() for i in e]
    dup = len(ext) - len(set(ext))
    dup += sum(len(p) - len(set(p)) for _, _, p in got.values())
    per_job = {}
    for key, (vni, _, _) in got.items():
        per_job.setdefault(key.split("/")[0], set()).add(tuple(vni))
    dup += sum(len(v) - 1 for v in per_job.values())
    vnis = [next(iter(v)) for v in per_job.values()]
    return dup + len(vnis) - len(set(vnis))


# --------------------------------------------------------------------------- the bench
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", default="10,100,1000")
    ap.add_argument("--reps", type=int, default=int(os.environ.get("BENCH_REPS", "3")))
    ap.add_argument("--workers", default="8x16", help="PROCESSESxTHREADS: concurrent clients")
    ap.add_argument("--cap", type=float, default=60.0, help="seconds per phase before cutting a run")
    ap.add_argument("--designs", default="old,new")
    ap.add_argument("--jobs32", action=argparse.BooleanOptionalAction, default=True, help="the 32 jobs x 32 hosts case")
    ap.add_argument("--churn", type=int, default=320, help="jobs that come and go (8 at once, 4 hosts each) before "
                    "counting keys and the database size after a compaction and defragmentation (0: skip)")
    ap.add_argument("--out", default=report.RESULTS)
    ap.add_argument("--etcd-dir", default=None, help="where the members keep their data (default: a new dir under $TMPDIR)")
    ap.add_argument("--keep", metavar="JSON", help="keep the results of the designs not run now from this scale.json")
    ap.add_argument("--render", metavar="JSON", help="only write the Markdown and the plot again from a scale.json")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        write(data["results"], args.out, data.get("clients", 0), data.get("cap", args.cap), data.get("churn"))
        return
    procs, threads = map(int, args.workers.split("x"))
    sizes = [int(h) for h in args.hosts.split(",") if h]
    designs = args.designs.split(",")

    from pcocc.testcluster.etcd3 import Etcd3

    base = Path(tempfile.mkdtemp(prefix="pcocc-scale-", dir=args.etcd_dir))
    cluster = Etcd3(base, log=print)
    stop = {}

    def interrupted(signum, frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    results, churn = [], None
    try:
        cluster.start()
        run = Run(cluster.endpoints, procs, threads, args.cap)
        cases = [(d, 1, h) for d in designs for h in sizes]
        if args.jobs32:
            cases += [(d, 32, 32) for d in designs]
        for design, jobs, hosts in cases:
            reps = args.reps if design == "new" or jobs * hosts <= 100 else 1
            runs = []
            for r in range(reps):
                fig = run.once(design, jobs, hosts)
                runs.append(fig)
                print(f"{design:3} {jobs}x{hosts} hosts run {r + 1}/{reps}: set-up {fig['setup_s']:.2f} s, "
                      f"teardown {fig['teardown_s']:.2f} s, {fig['requests'] / fig['vms']:.2f}+{fig['requests_down'] / fig['vms']:.2f} requests/VM, "
                      f"{len(fig['errors'])} errors, not done {fig['not_done']}, {fig['duplicates']} duplicates, "
                      f"{fig['keys_left']} keys left, load average {fig['loadavg'][0]:.0f}", flush=True)
                for e in fig["errors"][:3]:
                    print("   ", e)
            results.append({"design": design, "jobs": jobs, "hosts_per_job": hosts, "runs": runs})
        if args.churn and "new" in designs:
            churn = churn_run(run, cluster, args.churn)
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    if args.keep:
        with open(args.keep) as f:
            kept = [r for r in json.load(f)["results"] if r["design"] not in designs]
        results = sorted(kept + results, key=lambda r: (r["jobs"] > 1, r["design"] != "old"))
    write(results, args.out, procs * threads, args.cap, churn)


def churn_run(run, cluster, jobs):
    """`jobs` jobs of 4 hosts come and go, 8 at once, on the new layout (pools not cleaned
    between them): keys and database size before and after, each after a compaction and
    defragmentation."""
    from pcocc.store.etcd import EtcdStore

    def measure():
        after = cluster.compact_and_defrag()
        admin = EtcdStore(cluster.endpoints)
        keys = int(admin.client.call("kv/range", {"key": "AA==", "range_end": "AA==", "count_only": True}).get("count", 0))
        pools = len(admin.range("/pcocc/global/pools/")) + len(admin.range("/pcocc/global/pool-owners/"))
        admin.close()
        return {"keys": keys, "pool_keys": pools, "db_bytes": max(m["db_bytes"] for m in after)}

    before = measure()
    errors = duplicates = 0
    t0 = time.perf_counter()
    requests = 0
    for k in range(0, jobs, 8):
        fig = run.once("new", 8, 4, clean=False, job_base=10_000 + k)
        errors += len(fig["errors"]) + sum(fig["not_done"])
        duplicates += fig["duplicates"]
        requests += fig["requests"] + fig["requests_down"]
    elapsed = time.perf_counter() - t0
    after = measure()
    out = {"jobs": jobs, "vms": jobs * 4 * VMS, "seconds": elapsed, "errors": errors, "duplicates": duplicates,
           "requests_per_vm": requests / (jobs * 4 * VMS), "before": before, "after": after}
    print(f"churn: {jobs} jobs in {elapsed:.1f} s: keys {before['keys']} -> {after['keys']}, pool keys "
          f"{before['pool_keys']} -> {after['pool_keys']}, db {before['db_bytes']} -> {after['db_bytes']} bytes", flush=True)
    return out


def _per_vm_ms(run):
    """Set-up milliseconds per VM, over the VMs whose host was done (a cut run: its rate)."""
    return run["setup_s"] / max(1, run["hosts_done"] * VMS) * 1000


def _median(runs, key):
    return statistics.median(r[key] for r in runs)


def write(results, out, clients, cap, churn=None):
    report.RESULTS = out
    rows, prev = [], {}
    for res in results:
        runs, design = res["runs"], res["design"]
        complete = [r for r in runs if not r["errors"] and r["not_done"] == [0, 0]]
        setup, down = _median(runs, "setup_s"), _median(runs, "teardown_s")
        vms = runs[0]["vms"]
        per_vm = statistics.median(_per_vm_ms(r) for r in runs)
        done = statistics.median(r["hosts_done"] for r in runs)
        case = f"{res['jobs']} x {res['hosts_per_job']}" if res["jobs"] > 1 else f"{res['hosts_per_job']}"
        growth = ""
        if res["jobs"] == 1 and design in prev:
            p_setup, p_vm, p_hosts = prev[design]
            growth = f"x{setup / p_setup:.1f} total, x{per_vm / p_vm:.2f} per VM (hosts x{res['hosts_per_job'] / p_hosts:g})"
            if done != runs[0]["hosts"]:
                growth = f"x{per_vm / p_vm:.2f} per VM, at the rate of the hosts done"
        if res["jobs"] == 1:
            prev[design] = (setup, per_vm, res["hosts_per_job"])
        errors = sum(len(r["errors"]) for r in runs)
        not_done = sum(sum(r["not_done"]) for r in runs)
        setup_text = f"{setup:.2f}" if done == runs[0]["hosts"] else f"cut at {setup:.0f} ({done:.0f}/{runs[0]['hosts']} hosts done)"
        rows.append([design, case, vms, f"{len(complete)}/{len(runs)}", setup_text, f"{per_vm:.3f}", growth or "-",
                     f"{_median(runs, 'requests') / vms:.2f}", f"{down:.2f}", f"{_median(runs, 'requests_down') / vms:.2f}",
                     errors, not_done,
                     sum(r["duplicates"] for r in runs), max(r["keys_left"] for r in runs),
                     f"{_median(runs, 'keys_at_peak'):.0f}", f"{statistics.median(r['loadavg'][0] for r in runs):.0f}"])
    headers = ["design", "hosts (jobs x hosts)", "VMs", "complete runs", "set-up s (median)", "ms per VM",
               "growth vs previous size", "etcd requests per VM (set-up)", "teardown s", "etcd requests per VM (teardown)", "errors", "hosts cut at cap",
               "duplicate ids", "pool keys left after teardown", "keys at peak", "load average at start"]
    notes = {
        "setup": f"3-member etcd (pcocc.testcluster.etcd3) on this host; {clients} concurrent clients (each its own connection); "
                 f"each host: the job's VXLAN id, 16 external addresses (/16), 16 host ports (pool of 100 per host), as node setup asks; "
                 f"a phase is cut after {cap:g} s; old design run once above 100 hosts",
        "old": "one key per pool holding {id: owner}, rewritten by compare-and-swap (Store.update, 100 attempts)",
        "new": "one key per taken id created in a transaction with the owner's key (src/pcocc/allocator.py)",
        "load": "the host is shared (other test suites run qemu beside): the load average at the start of each run is in the "
                "last column; compare designs at equal load, and requests per VM, which do not depend on it",
    }
    if churn:
        notes["churn"] = (f"{churn['jobs']} jobs of 4 hosts x 16 VMs came and went (8 at once) in {churn['seconds']:.1f} s, "
                          f"{churn['errors']} errors, {churn['duplicates']} duplicate ids, "
                          f"{churn['requests_per_vm']:.2f} etcd requests per VM (set-up + teardown); after a compaction and "
                          f"defragmentation: keys {churn['before']['keys']} before -> {churn['after']['keys']} after "
                          f"(pool keys {churn['before']['pool_keys']} -> {churn['after']['pool_keys']}; the rest are the "
                          f"pools' sweep markers), database {churn['before']['db_bytes'] / 2**20:.2f} -> "
                          f"{churn['after']['db_bytes'] / 2**20:.2f} MiB")
    report.write("scale", "Id allocation at cluster scale: single-key pools (old) against one key per id (new)",
                 headers, rows, extra=notes)
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump({"benchmark": "scale", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "headers": headers, "rows": rows,
                   "notes": notes, "results": results, "churn": churn, "clients": clients, "cap": cap}, f, indent=1)
    plot(results, os.path.join(out, "scale.png"))


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for design, style in (("old", "o--"), ("new", "s-")):
        pts = [(r["hosts_per_job"], r["runs"]) for r in results if r["design"] == design and r["jobs"] == 1]
        if not pts:
            continue
        xs = [h for h, _ in pts]
        left.plot(xs, [_median(runs, "setup_s") for _, runs in pts], style, label=design)
        right.plot(xs, [statistics.median(_per_vm_ms(r) for r in runs) for _, runs in pts], style, label=design)
        for h, runs in pts:
            if any(r["errors"] or any(r["not_done"]) for r in runs):
                done = statistics.median(r["hosts_done"] for r in runs)
                left.annotate(f"cut: {done:.0f}/{h} hosts done", (h, _median(runs, "setup_s")), textcoords="offset points",
                              xytext=(-60, 8), fontsize=8)
    for ax, title in ((left, "set-up wall time (s)"), (right, "set-up time per VM done (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("hosts (16 VMs each)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Id allocation on a 3-member etcd (median of runs; 2-core host)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
