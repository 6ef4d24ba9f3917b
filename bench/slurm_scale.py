"""One virtual cluster over a whole real SLURM test cluster: node setup, start, exec fan-out,
teardown and leftovers, timed (issue 15).

    .venv/bin/python bench/slurm_scale.py --nodes 16 [--etcd-auth password|none] [--exec-runs 5]
    .venv/bin/python bench/slurm_scale.py --rewrite      # the Markdown again from the JSON

Brings up the project's test cluster (pcocc.testcluster: slurmctld, N slurmd nodes each in
its own network and UTS namespace with its own userspace Open vSwitch, the SPANK plugin)
with its store moved to a 3-member etcd (authentication on, as in production, or off with
--etcd-auth none), an L3 ethernet network with VXLAN between the nodes and an unprivileged
user, as bench/faults.py's SLURM backend does (its SlurmBench is reused: etcd, leftover
counts, `setup cleanup`). Then, with one job:

- submits `pcocc batch --wait -N N --ntasks-per-node=1 --mem-per-cpu=256 net:N` (one tiny VM
  of 256 MiB per node, TCG here; its kernel command line gets --guest-append, by default
  no_timer_check, without which guests of an overloaded host may panic at boot) and polls
  the store every 0.5 s: when each node's record became `complete` (from submission), its
  own timings (`wait` for the cluster record and the peers, `create` of the node's objects),
  when each VM entered `qemu-start` and `running` (its record's `since`), and when
  `batch --wait` returned. The plugin's line in slurmd's log gives when each node's setup
  started. A failed start is recorded with etcd's metrics (auth revision, slow applies) and
  its logs (--logs), torn down and checked for leftovers, and the start is tried again (up
  to --attempts);
- lists the VMs whose record says no guest agent answered, with the end of their console;
- times `pcocc ps` (the CLI's own cost), `pcocc exec true` and `pcocc exec hostname` over all
  VMs (median of --exec-runs; a VM that does not answer is recorded with its error);
- times `pcocc cancel`, the job's departure from squeue, and the first moment nothing of the
  job is left (faults.py's count: processes, run dirs, overlays, devices, OVS bridges and
  ports, netns, iptables rules, dnsmasq, undo logs, the plugin's markers, store keys and pool
  entries on every node); each node's teardown time comes from the plugin's
  "node cleanup done in X s" line. What is still there SETTLE (60) s after the cancel is a
  leftover; `pcocc internal setup cleanup` then runs on every node and what it removed is
  reported apart.

The 1-minute load average is sampled throughout (the host has 2 cores, and other benches
may share it). Results: bench/results/slurm_scale.md and slurm_scale.json, one row per
node count, authentication and guest command line (a run replaces its own kind's row and
keeps the others; the JSON's "findings", written by whoever read the runs, are kept and
shown). Everything started is stopped by pid, and the test cluster is taken down, also on
failure.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import faults  # noqa: E402 - its sys.path set-up (src, tests) comes first
import report  # noqa: E402
from faults import CheckFailed, SlurmBench, log, poll, stop  # noqa: E402

RESULTS = HERE / "results"
NAME = "slurm_scale"
POLL = 0.5  # s between two looks at the store while the cluster starts


class ScaleBench(SlurmBench):
    """faults.SlurmBench on a test cluster of its own base (/tmp/pcocc-tc-scale-PID) and network."""

    def __init__(self, workdir, nodes, auth="password", append_extra=""):  # noqa: super().__init__ not called: its base and network differ
        from local_site import image_cache_dir
        from pcocc.images.build import build_image
        from pcocc.testcluster import TestCluster
        from test_slurm_cluster import SlurmSite

        self.workdir = Path(workdir)
        self.etcd = None
        self.extra = []
        self.cleanup_runs = []
        self.etcd_kills = 0
        image = build_image("tiny", None, image_cache_dir(), log=lambda line: log(line))
        self.tc = TestCluster(f"/tmp/pcocc-tc-scale-{os.getpid()}", nodes=nodes, log=log)
        try:
            started = time.monotonic()
            self.tc.up()
            self.up_s = time.monotonic() - started
            self.auth = auth
            self._etcd3()
            self.net = f"{faults.SPREFIX}{self.tc.id}"
            conf = Path(self.tc.env["PCOCC_SYSTEM_CONF_DIR"])
            with open(conf / "networks.yaml", "a") as f:
                f.write(faults.slurm_net(self.net, faults.SPREFIX, mac="52:54:00:7b", int_network="10.84.0.0/24",
                                         ext_network="10.85.0.0/24", domain="scale.test", host_ports=(42000, 42099)))
            with open(conf / "resources.yaml", "a") as f:
                f.write(f"scalel3:\n  networks: [{self.net}]\n")
            entry = self.tc.add_user()
            tpl = "tiny:\n  image: user:tiny\nnet:\n  inherits: tiny\n  resource-set: scalel3\n"
            if append_extra:  # the image's kernel command line and more, through qemu's own -append
                tpl += f"  custom-args: ['-append', '{image.append} {append_extra}']\n"
            self.site = SlurmSite.with_image(self.tc, entry.pw_name, image, "repo", tpl)
            self.user, self.pw = entry.pw_name, entry
        except BaseException:
            self.close()
            raise

    CANCEL_TIMEOUT = 300

    def _etcd3(self):
        # with auth "none" the same 3 members run with authentication off (etcd-auth-type: none):
        # the node setups then make no etcd account and clients never authenticate
        super()._etcd3(auth=self.auth == "password")

    def close(self):
        super().close()
        if hasattr(self, "pw"):  # its VMs' run dir and KVM probe cache (as the test fixture removes them)
            shutil.rmtree(f"/tmp/pcocc-{self.pw.pw_uid}", ignore_errors=True)
            Path(f"/tmp/pcocc-accel-{self.pw.pw_uid}.json").unlink(missing_ok=True)


class Load:
    """The 1-minute load average, sampled every second in a thread: (start, max, end)."""

    def __init__(self):
        self.samples = [os.getloadavg()[0]]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(1):
            self.samples.append(os.getloadavg()[0])

    def finish(self):
        self.done.set()
        self.thread.join()
        return {"start": round(self.samples[0], 2), "max": round(max(self.samples), 2),
                "end": round(self.samples[-1], 2)}


def slurmd_lines(tc, node, pattern):
    """[(epoch seconds, line)] of node's slurmd log matching pattern."""
    path = Path(tc.base) / "slurm" / "log" / f"slurmd-{node}.log"
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\]", line)
            if m and re.search(pattern, line):
                out.append((datetime.fromisoformat(m.group(1)).timestamp(), line))
    return out


def start_cluster(bench, n, timeout):
    """Submit one VM per node with batch --wait and follow the start in the store; the figures."""
    user = bench.user
    t0 = time.time()
    proc = bench.popen("batch", "--wait", "-N", n, "--ntasks-per-node=1", "--mem-per-cpu=256", f"net:{n}")
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        stop(proc)
        raise CheckFailed(f"batch printed no job id: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}")
    jobid = int(line)
    log(f"job {jobid}: {n} VMs submitted")
    prefix = f"/pcocc/users/{user}/clusters/{jobid}/"
    node_done, vm_seen, waited, store_errors = {}, {}, None, []
    records = {}
    deadline = time.monotonic() + timeout
    last = ""
    try:
        while True:
            now = time.time()
            if waited is None and proc.poll() is not None:
                waited = now - t0
            try:
                records = bench.keys(prefix)
            except Exception as exc:  # noqa: BLE001 - a slow store: counted, and the next poll reads again
                store_errors.append(f"{now - t0:.0f} s: {exc}")
                log(f"poll at {now - t0:.0f} s: {exc}")
                time.sleep(POLL)
                continue
            nodes = {k.rsplit("/", 1)[1]: v for k, v in records.items() if k.startswith(prefix + "nodes/")}
            vms = {v["name"]: v for k, v in records.items() if k.startswith(prefix + "vms/") and isinstance(v, dict)}
            for node, rec in nodes.items():
                if rec.get("state") in ("complete", "failed") and node not in node_done:
                    node_done[node] = now - t0
            for name, v in vms.items():
                seen = vm_seen.setdefault(name, {})
                if v.get("state") and v["state"] not in seen:
                    seen[v["state"]] = (v.get("since") or now) - t0
            failed = [f"{k}: {v.get('error')}" for k, v in {**nodes, **vms}.items() if v.get("state") == "failed"]
            if failed:
                raise CheckFailed(f"job {jobid} failed to start: {failed[:5]}")
            running = sum(v.get("state") == "running" for v in vms.values())
            status = f"{len(node_done)}/{n} nodes set up, {running}/{n} VMs running"
            if status != last:
                log(f"job {jobid} at {now - t0:.0f} s: {status}")
                last = status
            if running == n and waited is not None:
                break
            if waited is not None and proc.returncode != 0:
                raise CheckFailed(f"batch --wait failed ({proc.returncode}): {proc.stderr.read().strip()}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"job {jobid} not started after {timeout} s: {status}")
            time.sleep(POLL)
    except BaseException:
        stop(proc)
        bench._last = jobid
        raise
    nodes = {k.rsplit("/", 1)[1]: v for k, v in records.items() if k.startswith(prefix + "nodes/")}
    setup_start = {}
    for node in bench.tc.node_names:
        lines = slurmd_lines(bench.tc, node, rf"pcocc: job {jobid} step \d+: .*setup create")
        if lines:
            setup_start[node] = lines[0][0] - t0
    per_node = {}
    for node in bench.tc.node_names:
        rec = nodes.get(node, {})
        t = rec.get("timings", {})
        start, done = setup_start.get(node), node_done.get(node)
        per_node[node] = {"plugin_start_s": _r(start), "complete_s": _r(done),
                          "wall_s": _r(done - start) if start is not None and done is not None else None,
                          "wait_s": t.get("wait"), "create_s": t.get("create"),
                          "setup_s": _r((t.get("wait") or 0) + (t.get("create") or 0)) if t else None}
    slowest = max(per_node, key=lambda nd: per_node[nd]["wall_s"] or 0)
    return jobid, {
        "jobid": jobid,
        "nodes": per_node,
        "vms": {name: {k: _r(v) for k, v in seen.items()} for name, seen in sorted(vm_seen.items())},
        "slowest_node": slowest,
        "slowest_wall_s": per_node[slowest]["wall_s"],
        "slowest_setup_s": max((p["setup_s"] or 0) for p in per_node.values()),
        "slowest_create_s": max((p["create_s"] or 0) for p in per_node.values()),
        "all_nodes_complete_s": _r(max(node_done.values())),
        "all_qemu_s": _r(max((s.get("qemu-start") or s.get("booting") or s.get("running") or 0) for s in vm_seen.values())),
        "all_running_s": _r(max(s.get("running", 0) for s in vm_seen.values())),
        "batch_wait_s": _r(waited),
        "bench_store_errors": store_errors,
    }


def silent_guests(bench, jobid):
    """{vm: the end of its console log} of the VMs whose record says no guest agent answered."""
    from leftovers import run_dir

    out = {}
    prefix = f"/pcocc/users/{bench.user}/clusters/{jobid}/vms/"
    for v in bench.keys(prefix).values():
        if isinstance(v, dict) and v.get("agent") == "none":
            with contextlib.suppress(OSError):
                text = (Path(run_dir(bench.site, jobid)) / v["name"] / "console.log").read_text(errors="replace")
                out[v["name"]] = " | ".join(line.strip() for line in text.splitlines()[-3:])[-300:]
            out.setdefault(v["name"], "(no console log)")
    return out


def exec_fanout(bench, jobid, n, runs):
    """Median wall times of `pcocc exec true` and `pcocc exec hostname` over every VM."""
    out = {}
    times = []
    for _ in range(runs):  # the CLI's own cost (start, store, no VM reached): exec's baseline
        t = time.monotonic()
        r = bench.pcocc("ps", "-j", jobid, timeout=600)
        times.append(time.monotonic() - t)
    out["ps"] = {"median_s": _r(statistics.median(times)), "runs_s": [_r(t) for t in times]}
    log(f"ps: median {out['ps']['median_s']} s over {runs} runs {out['ps']['runs_s']}")
    for cmd in ("true", "hostname"):
        times = []
        failures, answered = [], []
        for _ in range(runs):
            t = time.monotonic()
            r = bench.pcocc("exec", "-j", jobid, cmd, timeout=600)
            times.append(time.monotonic() - t)
            if r.returncode != 0:  # every VM still gets a result: which ones did not answer, and why
                failures.append(f"exit {r.returncode}: {' | '.join(r.stderr.strip().splitlines()[:n])[:1500]}")
            if cmd == "hostname":
                answered.append(len({line.split(":", 1)[0] for line in r.stdout.splitlines() if ":" in line}))
        out[cmd] = {"median_s": _r(statistics.median(times)), "runs_s": [_r(t) for t in times], "failed_runs": failures}
        if answered:
            out[cmd]["vms_answered"] = answered
        log(f"exec {cmd}: median {out[cmd]['median_s']} s over {runs} runs {out[cmd]['runs_s']}"
            f"{'; failures: ' + failures[0] if failures else ''}")
    return out


def teardown(bench, jobid, timeout):
    """Cancel; when the job left the queue, when nothing of it was left; leftovers after SETTLE."""
    t0 = time.time()
    r = bench.pcocc("cancel", "-j", jobid, timeout=timeout)
    cancel_s = time.time() - t0
    if r.returncode != 0 and bench.in_queue(jobid):
        raise CheckFailed(f"cancel failed ({r.returncode}): {r.stderr.strip()}")
    poll(lambda: not bench.in_queue(jobid), timeout, f"job {jobid} to leave the queue", interval=0.5)
    out_of_queue_s = time.time() - t0
    clean_s, left = None, {}
    deadline = time.monotonic() + faults.SETTLE
    while True:
        counted = time.time()
        left = {k: v for k, v in bench.count(jobid).items() if v}
        if not left:
            clean_s = counted - t0  # counted from this moment on: an upper bound of it
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    per_node = {}
    for node in bench.tc.node_names:
        lines = slurmd_lines(bench.tc, node, rf"pcocc: job {jobid}: node cleanup done in")
        if lines:
            per_node[node] = {"done_s": _r(lines[-1][0] - t0),
                              "took_s": float(re.search(r"done in ([\d.]+) s", lines[-1][1]).group(1))}
    by_cleanup = {}
    if left:
        log(f"job {jobid} left after {faults.SETTLE} s: {json.dumps(left)[:2000]}")
        bench.setup_cleanup()
        after = {k: v for k, v in bench.count(jobid).items() if v}
        by_cleanup = {k: v for k, v in left.items() if k not in after or len(after[k]) < len(v)}
        left = after
    return {
        "cancel_s": _r(cancel_s), "out_of_queue_s": _r(out_of_queue_s), "clean_s": _r(clean_s),
        "nodes": per_node, "slowest_node_teardown_s": max((p["took_s"] for p in per_node.values()), default=None),
        "nodes_with_cleanup_line": len(per_node), "removed_by_setup_cleanup": by_cleanup, "leftovers": left,
    }


def etcd_metrics(bench, names=("etcd_debugging_auth_revision", "etcd_debugging_mvcc_current_revision",
                                "etcd_server_leader_changes_seen_total", "etcd_server_slow_apply_total")):
    """{metric: value} of the first running member's /metrics (auth revision: each change of the
    auth store, which invalidates every client's token)."""
    out = {}
    for m in bench.etcd.members:
        if not m.pid:
            continue
        with contextlib.suppress(OSError):
            text = faults_opener().open(f"{m.client_url}/metrics", timeout=20).read().decode()
            for line in text.splitlines():
                name = line.split(" ")[0].split("{")[0]
                if name in names:
                    out[name] = out.get(name, 0) + float(line.split()[-1])
            return out
    return out


def faults_opener():
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def keep_logs(bench, logs, tag):
    """slurmd's and etcd's logs of a failed attempt, before down() removes them."""
    dest = Path(logs) / tag
    with contextlib.suppress(OSError):
        shutil.copytree(Path(bench.tc.base) / "slurm" / "log", dest / "slurm", dirs_exist_ok=True)
        for m in bench.etcd.members:
            with contextlib.suppress(OSError):
                shutil.copy(bench.etcd.base / f"{m.name}.log", dest / f"etcd-{m.name}.log")
        for node in bench.tc.node_names:
            with contextlib.suppress(OSError):
                shutil.copytree(bench.tc.node_state_dir(node), dest / "nodes" / node, dirs_exist_ok=True)
    log(f"logs of {tag} kept in {dest}")


def _r(x, nd=2):
    return None if x is None else round(x, nd)


def one_run(n, exec_runs, start_timeout, attempts, logs, auth, append_extra):
    workdir = tempfile.mkdtemp(prefix="pcocc-slurm-scale-")
    load = Load()
    result = {"nodes": n, "etcd_auth": auth, "guest_append_extra": append_extra, "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
              "failed_starts": []}
    bench = None
    try:
        bench = ScaleBench(workdir, n, auth, append_extra)
        result["testcluster_up_s"] = _r(bench.up_s)
        for attempt in range(1, attempts + 1):
            before = etcd_metrics(bench)
            bench._last = None
            try:
                jobid, result["start"] = start_cluster(bench, n, start_timeout)
            except CheckFailed as exc:  # a failed start is a finding: its error, and what its teardown left
                keep_logs(bench, logs, f"{n}-nodes-attempt-{attempt}")
                failed = {"attempt": attempt, "error": str(exc), "etcd_before": before, "etcd_after": etcd_metrics(bench)}
                if bench._last:
                    try:
                        failed["teardown"] = teardown(bench, bench._last, 600)
                    except Exception as texc:  # noqa: BLE001
                        failed["teardown_error"] = f"{type(texc).__name__}: {texc}"
                result["failed_starts"].append(failed)
                log(f"attempt {attempt}: {exc}; etcd {before} -> {failed['etcd_after']}")
                if attempt == attempts:
                    raise
                continue
            bench._last = jobid
            result["start"]["etcd_before"], result["start"]["etcd_after"] = before, etcd_metrics(bench)
            break
        result["silent_guests"] = silent_guests(bench, jobid)
        if result["silent_guests"]:
            log(f"VMs whose guest agent never answered: {json.dumps(result['silent_guests'])[:1500]}")
        result["exec"] = exec_fanout(bench, jobid, n, exec_runs)
        result["teardown"] = teardown(bench, jobid, 600)
    except (CheckFailed, Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the figures so far are kept with the error
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"run of {n} nodes failed: {exc}\n{traceback.format_exc(limit=6)}")
        if bench is not None and getattr(bench, "_last", None) and "teardown" not in result and "start" in result:
            with contextlib.suppress(Exception):
                result["teardown"] = teardown(bench, bench._last, 600)
    finally:
        if bench is not None:
            with contextlib.suppress(Exception):
                keep_logs(bench, logs, f"{n}-nodes-{auth}-end")
            t = time.monotonic()
            bench.close()
            result["testcluster_down_s"] = _r(time.monotonic() - t)
            with contextlib.suppress(Exception):
                result["testcluster_leftovers"] = bench.tc.leftovers()
        shutil.rmtree(workdir, ignore_errors=True)
        result["load_1min"] = load.finish()
    return result


HEADERS = ["nodes", "VMs", "etcd auth", "guest cmdline +", "failed starts", "slowest node setup, plugin to complete (s)", "slowest node setup, record (s)",
           "slowest node create (s)", "all nodes set up (s)", "all qemu (s)", "all VMs running (s)",
           "batch --wait (s)", "silent guests", "ps (s)", "exec true (s)", "exec hostname (s)",
           "cancel (s)", "out of queue (s)", "clean (s)", "slowest node teardown (s)", "leftovers", "load max"]


def row(r):
    s, e, t = r.get("start", {}), r.get("exec", {}), r.get("teardown", {})
    left = sum(len(v) for v in t.get("leftovers", {}).values()) if t else "not checked"
    return [r["nodes"], r["nodes"], r.get("etcd_auth", "password"), r.get("guest_append_extra") or "-",
            len(r.get("failed_starts", [])), s.get("slowest_wall_s", ""), s.get("slowest_setup_s", ""), s.get("slowest_create_s", ""),
            s.get("all_nodes_complete_s", ""), s.get("all_qemu_s", ""), s.get("all_running_s", ""),
            s.get("batch_wait_s", ""), len(r["silent_guests"]) if "silent_guests" in r else "", e.get("ps", {}).get("median_s", ""), e.get("true", {}).get("median_s", ""),
            e.get("hostname", {}).get("median_s", ""),
            t.get("cancel_s", ""), t.get("out_of_queue_s", ""), t.get("clean_s", "") if t.get("clean_s") is not None else "",
            t.get("slowest_node_teardown_s", "") if t.get("slowest_node_teardown_s") is not None else "",
            left, r.get("load_1min", {}).get("max", "")]


NOTES = ("One job of N tiny VMs (256 MiB, TCG), one per slurmd node, on an L3 ethernet network (VXLAN between the "
         "nodes' userspace Open vSwitches), store on a 3-member etcd. Times in seconds from the submission "
         "(start columns), or from `pcocc cancel` (teardown columns). Node setup, plugin to complete: from the "
         "plugin's 'setup create' line in slurmd's log to the first poll (every 0.5 s) that saw the node's record "
         "`complete` (pcocc's start, store connection, etcd account, set-up); record: the record's own timings "
         "(wait for the cluster record and the peers + create of the node's objects); 'all qemu' and "
         "'all VMs running' from the VM records' `since`; exec: median wall time of `pcocc exec` over every VM, beside `pcocc ps -j` (the CLI's own cost); "
         "clean: the first count that found nothing of the job (bench/faults.py's count on every node and in the "
         "store); slowest node teardown: the plugin's 'node cleanup done in X s'. 'load max': the 1-minute load "
         "average's maximum during the run, on 2 cores.")


def write(out, result=None):
    """The table of every run kept in the JSON, with result (a new run) replacing its kind's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    runs, findings = {}, []
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(path.read_text())
        runs, findings = previous.get("runs", {}), previous.get("findings", [])
    if result:
        runs[f"{result['nodes']}-{result.get('etcd_auth', 'password')}-{result.get('guest_append_extra') or 'plain'}"] = result
    ordered = sorted(runs.values(), key=lambda r: (r["nodes"], r.get("etcd_auth", "password") != "password"))
    errors = "; ".join(f"{r['nodes']} nodes, etcd auth {r.get('etcd_auth')}: {r['error']}"
                       for r in ordered if r.get("error")) or "none"
    report.RESULTS = str(out)
    report.write(NAME, "A virtual cluster over the whole SLURM test cluster: set-up, exec fan-out, teardown",
                 HEADERS, [row(r) for r in ordered], {"notes": NOTES, "errors": errors})
    md = out / f"{NAME}.md"
    png = out / f"{NAME}.png"
    if png.exists():  # one panel per column of a 20-column table: unreadable, the table says more
        png.unlink()
        md.write_text(md.read_text().replace(f"![{png.name}]({png.name})\n", ""))
    data = json.loads(path.read_text())
    data["runs"] = runs
    data["findings"] = findings  # what the runs showed, written by whoever read them: kept as it is
    path.write_text(json.dumps(data, indent=2) + "\n")
    lines = [md.read_text().rstrip("\n"), ""]
    if findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    for r in ordered:
        lines += [f"## {r['nodes']} nodes, etcd auth {r.get('etcd_auth', 'password')} ({r['date']})", "",
                  f"Test cluster up in {r.get('testcluster_up_s')} s, down in {r.get('testcluster_down_s')} s; "
                  f"1-minute load average {r.get('load_1min')}; test cluster leftovers after down: "
                  f"{r.get('testcluster_leftovers', 'not checked') or 'none'}.", ""]
        s = r.get("start")
        if s:
            lines += ["| node | plugin start (s) | complete seen (s) | plugin to complete (s) | record: wait (s) | "
                      "record: create (s) | teardown (s) |", "|---|---|---|---|---|---|---|"]
            tdn = r.get("teardown", {}).get("nodes", {})
            for node, p in s["nodes"].items():
                lines.append(f"| {node} | {p['plugin_start_s']} | {p['complete_s']} | {p.get('wall_s')} | {p['wait_s']} | "
                             f"{p['create_s']} | {tdn.get(node, {}).get('took_s', '')} |")
            lines.append("")
        t = r.get("teardown")
        if t and (t.get("leftovers") or t.get("removed_by_setup_cleanup")):
            lines += [f"Left {faults.SETTLE} s after the cancel, removed by `setup cleanup`: "
                      f"{json.dumps(t['removed_by_setup_cleanup'])}", "",
                      f"Still left after `setup cleanup`: {json.dumps(t['leftovers'])}", ""]
        for f in r.get("failed_starts", []):
            t = f.get("teardown", {})
            lines += [f"Failed start, attempt {f['attempt']}: {f['error']}", "",
                      f"etcd before and after it: {json.dumps(f.get('etcd_before'))} -> {json.dumps(f.get('etcd_after'))}; "
                      f"its teardown: cancel {t.get('cancel_s')} s, out of queue {t.get('out_of_queue_s')} s, clean "
                      f"{t.get('clean_s')} s, left {json.dumps(t.get('leftovers'))}, removed by `setup cleanup` "
                      f"{json.dumps(t.get('removed_by_setup_cleanup'))}{'; ' + f['teardown_error'] if f.get('teardown_error') else ''}", ""]
        if r.get("start", {}).get("etcd_before") is not None:
            lines += [f"etcd before and after the start: {json.dumps(r['start']['etcd_before'])} -> "
                      f"{json.dumps(r['start']['etcd_after'])}", ""]
        if r.get("note"):
            lines += [f"Note: {r['note']}", ""]
        for vm, tail in (r.get("silent_guests") or {}).items():
            lines += [f"- {vm}: no guest agent answered; its console ends: `{tail}`"]
        for cmd, e in (r.get("exec") or {}).items():
            for f in e.get("failed_runs", [])[:2]:
                lines += [f"- exec {cmd}: {f}"]
        lines.append("")
        if r.get("error"):
            lines += [f"Error: {r['error']}", ""]
    md.write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--exec-runs", type=int, default=5)
    p.add_argument("--start-timeout", type=int, default=1200, help="s for every VM to run (TCG on 2 cores is slow)")
    p.add_argument("--attempts", type=int, default=3, help="starts tried (a failed one is recorded, torn down, checked)")
    p.add_argument("--logs", default=f"/tmp/pcocc-slurm-scale-logs-{os.getpid()}", help="where a failed start's logs go")
    p.add_argument("--etcd-auth", choices=["password", "none"], default="password",
                   help="etcd-auth-type of the test cluster's pcocc (password: a production set-up)")
    p.add_argument("--guest-append", default="no_timer_check",
                   help="added to the tiny image's kernel command line ('' for none): without no_timer_check, "
                        "TCG guests of an overloaded host may panic at boot ('IO-APIC + timer doesn't work')")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--rewrite", action="store_true", help="write the Markdown again from the JSON's runs, run nothing")
    args = p.parse_args(argv)
    if args.rewrite:
        write(args.out)
        return 0
    if os.geteuid() != 0:
        sys.exit("bench/slurm_scale.py runs as root (the SLURM test cluster)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID: clean up, write what was measured
    result = one_run(args.nodes, args.exec_runs, args.start_timeout, args.attempts, args.logs, args.etcd_auth,
                     args.guest_append)
    write(args.out, result)
    left = result.get("teardown", {}).get("leftovers")
    return 1 if result.get("error") or left else 0


if __name__ == "__main__":
    sys.exit(main())
