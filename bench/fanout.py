"""`pcocc exec` fan-out to 16, 256 and 4,096 simulated VMs: the relay tree against direct TLS.

    .venv/bin/python bench/fanout.py [--sizes 16,256,4096] [--reps 5] [--reps-large 3] [--cap 180]

What runs, and what is real:
- Each VM is a real ``ControlServer`` (agent.endpoint: mutual TLS on loopback, and its unix
  socket) serving a FAKE VM: ``FakeGuestAgentHandler`` is the real ``ControlHandler`` (its
  ``relay`` op and credentials lookup are the real ones) whose ``exec_stream`` is a fake
  guest agent: it sends the "started" event at once and the command's end (status 0) after an
  emulated agent round of ``AGENT_DELAY`` (5 ms).  No qemu, no guest.
- 16 VMs per simulated host (1, 16, 256 hosts), the hosts spread over a few worker
  processes (``--workers``, not one per VM); each host's VMs have their unix sockets in a
  private (0700) directory of that host.
- The client is the real CLI, end to end: ``pcocc exec -j JOB -n true`` in a new process,
  against a SQLite store (a temporary PCOCC home) holding the simulated cluster's records
  and the owner's client credentials, exactly as `pcocc batch` writes them.  Two jobs name
  the same VMs: one whose records carry the unix sockets (the relay tree, agent.relay) and
  one without (records of an older pcocc: one TLS connection per VM, 16 threads: the
  former design).  The CLI runs under a wrapper (``--cli``) that counts its connect() calls
  and reports its CPU time (user + system, Python's start included) at exit.

Figures per (design, VMs): wall time of the exec (median of --reps runs; --reps-large at
4,096), client CPU time and connections per VM, the simulated hosts' CPU time per VM (all
workers, from /proc), and wall(N) / wall(16) within the same run.  Runs alternate the two
designs so that the machine's noise hits both.  The direct design at 4,096 VMs runs once,
cut after --cap seconds.  The load average is recorded: the machine is shared.

Last, what the relay adds to one exec on 1 and 4 VMs (first line, Ctrl-C to the end), relay
against direct, with the real VM handler and the unit tests' fake local agent (``latency``).

Results: bench/results/fanout.md, fanout.json and fanout.png.  Every worker is stopped by
its pid and the temporary directory removed, also on failure or Ctrl-C.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

AGENT_DELAY = 0.005  # s: the fake guest agent's emulated round (issue 15's must-show)
PER_HOST = 16
JOB_TREE, JOB_DIRECT = 9001, 9002


# ---------------------------------------------------------------------------- the simulated hosts
def _fake_handler_class():
    from pcocc.agent.endpoint import streaming
    from pcocc.lifecycle.control import ControlHandler

    class FakeGuestAgentHandler(ControlHandler):
        """A FAKE VM: the real ControlHandler (relay op, owner's credentials from the store)
        with a fake guest agent behind exec_stream: "started" at once, the end (status 0)
        after AGENT_DELAY seconds, whatever the command."""

        @streaming
        def op_exec_stream(self, stream, argv, user=None, stdin=False, input_b64=None, timeout=None):
            stream.send({"started": True, "stdin_window": 0})
            time.sleep(AGENT_DELAY)  # the fake agent's emulated round
            return {"status": 0, "killed": False, "timed_out": False}

    return FakeGuestAgentHandler


def worker(spec):
    """One process of simulated hosts: serves their VMs until its stdin closes."""
    import resource
    import threading
    from types import SimpleNamespace

    from pcocc import state
    from pcocc.agent.endpoint import ControlServer
    from pcocc.store.sqlite import SqliteStore

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(512 * 1024)  # thousands of accept threads
    Handler = _fake_handler_class()
    store = SqliteStore(spec["store"])
    ca = spec["ca"]

    def creds():  # as vmrun reads them: the owner's client credentials in the store
        return store.get(state.cluster_prefix(spec["user"], JOB_TREE) + "client")

    servers, out = [], []
    for host in spec["hosts"]:
        hostdir = os.path.join(spec["dir"], host)
        os.mkdir(hostdir, 0o700)
        for rank in spec["ranks"][host]:
            handler = Handler(SimpleNamespace(config=SimpleNamespace(name=f"vm{rank}")), None, relay_credentials=creds)
            srv = ControlServer(handler, ca_pem=ca["cert"], cert_pem=ca["server_cert"], key_pem=ca["server_key"],
                                owner=spec["user"], unix_path=os.path.join(hostdir, f"vm{rank}.sock")).start()
            servers.append(srv)
            out.append({"rank": rank, "host": host, "control": list(srv.address), "relay": srv.unix_path})
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the bench closes it (or dies)
    for srv in servers:
        srv.stop(timeout=0.5, drain=0)


class Hosts:
    """The worker processes of one size; stop() ends them by pid."""

    def __init__(self, work, store_path, user, ca, n, workers):
        hosts = [f"sim{h:04d}" for h in range(n // PER_HOST)]
        groups = [hosts[i::workers] for i in range(min(workers, len(hosts)))]
        self.procs, self.vms = [], []
        rundir = os.path.join(work, f"run{n}")
        os.mkdir(rundir, 0o700)
        try:
            for group in groups:
                spec = {"store": store_path, "user": user, "ca": ca, "dir": rundir, "hosts": group,
                        "ranks": {h: [int(h[3:]) * PER_HOST + i for i in range(PER_HOST)] for h in group}}
                p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                self.procs.append(p)
                p.stdin.write(json.dumps(spec) + "\n")
                p.stdin.flush()
            for p in self.procs:
                line = p.stdout.readline()
                if not line:
                    raise SystemExit("a worker of simulated hosts failed")
                self.vms += json.loads(line)
        except BaseException:
            self.stop()
            raise
        self.vms.sort(key=lambda vm: vm["rank"])

    def cpu(self):
        """CPU seconds (user + system) the workers used so far (/proc/PID/stat, proc(5))."""
        total = 0
        for p in self.procs:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


# ---------------------------------------------------------------------------- the client
def cli(outfile, argv):
    """The real CLI (pcocc.cli.core:main) with its connect() calls counted and its CPU time
    written to outfile at exit."""
    import atexit
    import socket

    count = {"connect": 0}
    real = socket.socket.connect

    def connect(self, address):
        count["connect"] += 1
        return real(self, address)

    socket.socket.connect = connect

    def report():
        t = os.times()
        with open(outfile, "w") as f:
            json.dump({"connects": count["connect"], "cpu": t.user + t.system}, f)

    atexit.register(report)
    from pcocc.cli.core import main

    sys.argv = ["pcocc", *argv]
    main()


def write_records(ctx, user, vms, ca, client, with_relay):
    from pcocc import state

    jobid = JOB_TREE if with_relay else JOB_DIRECT
    prefix = state.cluster_prefix(user, jobid)
    ctx.store.delete_prefix(prefix)
    ctx.store.put(prefix + "info", {"jobid": jobid, "name": f"fanout-{'tree' if with_relay else 'direct'}", "owner": user,
                                    "host": "simulated", "layout": [["fake", len(vms)]], "uuid": f"bench-{jobid}"})
    ctx.store.put(prefix + "client", client)
    ctx.store.put(prefix + "ca", ca)
    writes = []
    for vm in vms:
        record = {"rank": vm["rank"], "name": f"vm{vm['rank']}", "state": "running", "host": vm["host"],
                  "control": vm["control"], "agent": "ready"}
        if with_relay:
            record["relay"] = vm["relay"]
        writes.append((state.vm_key(user, jobid, vm["rank"]), record))
    for i in range(0, len(writes), 100):  # within the store's MAX_TXN_OPS
        ctx.store.transact({}, dict(writes[i:i + 100]))
    return jobid


def run_exec(env, work, jobid, n, cap):
    """(wall s, client CPU s, client connects, workers' CPU s, stderr) of one `pcocc exec -n true`."""
    out = os.path.join(work, "cli.json")
    if os.path.exists(out):
        os.unlink(out)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--cli", out, "--", "exec", "-j", str(jobid), "-n", "true"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = p.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return None
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"pcocc exec on {n} VMs: status {p.returncode}: {stderr.decode()[-2000:]}")
    with open(out) as f:
        got = json.load(f)
    return wall, got["cpu"], got["connects"], stderr.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,256,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reps-large", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--cap", type=float, default=180.0)
    ap.add_argument("--no-latency", action="store_true", help="skip the 1- and 4-VM latency comparison")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from pcocc.agent import pki
    from pcocc.context import Context
    from pcocc.env import Environment

    work = tempfile.mkdtemp(prefix="pcocc-bench-fanout-")
    hosts = None
    try:
        home = os.path.join(work, "home")
        os.makedirs(os.path.join(home, ".pcocc"), mode=0o700)
        env = dict(os.environ, HOME=home, PCOCC_SYSTEM_CONF_DIR=os.path.join(work, "etc"), PCOCC_RUN_DIR=os.path.join(work, "run"))
        env.pop("PCOCC_JOB_ID", None)
        ctx = Context(Environment(environ=env, home=home))
        user = ctx.env.user
        text = lambda b: b.decode() if isinstance(b, bytes) else b  # noqa: E731
        ca_cert, ca_key = pki.make_ca("pcocc cluster fanout-bench")
        server = pki.issue(ca_cert, ca_key, "pcocc-fanout", server=True, ips=("127.0.0.1",))
        owner = pki.issue(ca_cert, ca_key, user)
        ca = {"cert": text(ca_cert), "server_cert": text(server[0]), "server_key": text(server[1])}
        client = {"ca": text(ca_cert), "cert": text(owner[0]), "key": text(owner[1])}
        store_path = ctx.config.batch.settings["store-path"]
        ctx.store.put("/bench/ready", True)  # creates the store file before the workers read it

        runs = {}
        for n in sizes:
            t0 = time.perf_counter()
            hosts = Hosts(work, store_path, user, ca, n, min(args.workers, max(1, n // PER_HOST)))
            started = time.perf_counter() - t0
            write_records(ctx, user, hosts.vms, ca, client, True)
            write_records(ctx, user, hosts.vms, ca, client, False)
            reps = args.reps if n < 4096 else args.reps_large
            direct_reps = reps if n < 4096 else 1
            res = {"tree": [], "direct": [], "load": [], "hosts_start_s": round(started, 1)}
            for design, jobid in (("tree", JOB_TREE), ("direct", JOB_DIRECT)):  # warm-up: the OS caches
                run_exec(env, work, jobid, n, args.cap)
            for i in range(reps):
                for design, jobid in (("tree", JOB_TREE), ("direct", JOB_DIRECT)):
                    if design == "direct" and i >= direct_reps:
                        continue
                    before = hosts.cpu()
                    got = run_exec(env, work, jobid, n, args.cap)
                    after = hosts.cpu()
                    if got is None:
                        res[design].append(None)
                        print(f"{n} VMs, {design}: cut after {args.cap:g} s", file=sys.stderr, flush=True)
                        continue
                    wall, cpu, connects, stderr = got
                    res[design].append({"wall_s": wall, "client_cpu_s": cpu, "connects": connects, "hosts_cpu_s": after - before,
                                        "stderr": stderr[-500:]})
                    res["load"].append(os.getloadavg()[0])
                    print(f"{n} VMs, {design}: {wall:.2f} s, client CPU {cpu:.2f} s, {connects} connections, "
                          f"hosts' CPU {after - before:.2f} s, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            runs[n] = res
            hosts.stop()
            hosts = None
        lat = latency() if not args.no_latency else {}
        write(runs, args, sizes, lat)
    finally:
        if hosts is not None:
            hosts.stop()
        shutil.rmtree(work, ignore_errors=True)


def latency(reps=7):
    """First line and Ctrl-C through the relay against direct TLS, 1 and 4 VMs on one host:
    the real ControlHandler with the unit tests' fake local agent (tests/unit/
    test_exec_fake_agent.LocalAgent: the real runner script, run on this host), the CLI's exec
    loop (_ExecRun) in this process, so that the figures hold only what the relay changes
    (no CLI start, no guest).  {"VMs design what": [seconds]}, alternated runs."""
    import io
    from types import SimpleNamespace

    sys.path.insert(0, str(HERE.parent / "tests" / "unit"))
    from test_exec_fake_agent import LocalAgent

    from pcocc.agent import pki, qga
    from pcocc.agent.endpoint import ControlClient, ControlServer
    from pcocc.cli.access import _ExecRun
    from pcocc.lifecycle.control import ControlHandler

    tmp = tempfile.mkdtemp(prefix="pcocc-bench-latency-")
    qga.EXEC_TMP = tmp  # the runner's private directories
    ca = pki.make_ca("latency")
    srv = pki.issue(*ca, "vm", server=True, ips=("127.0.0.1",))
    own = pki.issue(*ca, "alice")
    owner_creds = {"ca": ca[0], "cert": own[0], "key": own[1]}

    def client(address, timeout):
        return ControlClient(tuple(address), ca_pem=ca[0], cert_pem=own[0], key_pem=own[1], timeout=timeout)

    class Out(io.RawIOBase):
        def __init__(self, seen):
            self.seen = seen

        def writable(self):
            return True

        def write(self, b):
            self.seen(bytes(b))
            return len(b)

    def run(vms, tree, command, seen):
        recs = [vm if tree else {k: v for k, v in vm.items() if k != "relay"} for vm in vms]
        targets = SimpleNamespace(vms=recs, ranks=list(range(len(recs))), client=lambda r, t: client(recs[r]["control"], t), connect=client)
        data = []
        out = io.TextIOWrapper(io.BufferedWriter(Out(lambda b: (data.append(b), seen(b"".join(data))))), write_through=True)
        app = SimpleNamespace(env=SimpleNamespace(stdout=out, stderr=io.TextIOWrapper(io.BytesIO(), write_through=True)))
        return _ExecRun(app, targets, {"argv": ["/bin/sh", "-c", command], "user": None}, None, False).run()

    res = {}
    servers, agents = [], []
    try:
        for n in (1, 4):
            hostdir = os.path.join(tmp, f"h{n}")
            os.mkdir(hostdir, 0o700)
            vms = []
            for r in range(n):
                agents.append(LocalAgent())
                handler = ControlHandler(SimpleNamespace(config=SimpleNamespace(name=f"vm{r}")), agents[-1], relay_credentials=lambda: owner_creds)
                servers.append(ControlServer(handler, ca_pem=ca[0], cert_pem=srv[0], key_pem=srv[1], owner="alice",
                                             unix_path=os.path.join(hostdir, f"vm{r}.sock")).start())
                vms.append({"name": f"vm{r}", "state": "running", "host": "h", "control": list(servers[-1].address), "relay": servers[-1].unix_path})
            for tree in (True, False):
                run(vms, tree, "true", lambda data: None)  # warm-up
            for _ in range(reps):
                for tree in (True, False):
                    design = "tree" if tree else "direct"
                    time.sleep(0.7)  # the next spare runner gets ready, as between two commands typed
                    t0, got = time.perf_counter(), {}

                    def first(data):
                        if "t" not in got and data.count(b"first") >= n:
                            got["t"] = time.perf_counter() - t0

                    run(vms, tree, "echo first", first)
                    res.setdefault(f"{n} {design} first line", []).append(got["t"])
                    time.sleep(0.7)

                    def interrupt(data):
                        if "t" not in got and data.count(b"started") >= n:
                            got["t"] = time.perf_counter()
                            os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C sends

                    got = {}
                    status = run(vms, tree, "sleep 100 & echo started; wait", interrupt)
                    if status != 130:
                        raise SystemExit(f"Ctrl-C: status {status}")
                    res.setdefault(f"{n} {design} Ctrl-C", []).append(time.perf_counter() - got["t"])
    finally:
        for s in servers:
            s.stop(timeout=2, drain=0.5)
        for a in agents:
            a.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _median(samples, key):
    values = [s[key] for s in samples if s]
    return statistics.median(values) if values else None


def write(runs, args, sizes, lat):
    import report

    from pcocc.agent import relay

    base = {d: _median(runs[sizes[0]][d], "wall_s") for d in ("tree", "direct")}
    rows = []
    for n in sizes:
        for design in ("tree", "direct"):
            samples = runs[n][design]
            if not samples:
                continue
            wall = _median(samples, "wall_s")
            if wall is None:
                rows.append([f"{design} ({'relays' if design == 'tree' else 'one TLS per VM'})", n, n // PER_HOST,
                             f"cut at {args.cap:g} s", "", "", "", "", ""])
                continue
            rows.append([
                f"{design} ({'relays' if design == 'tree' else 'one TLS per VM'})", n, n // PER_HOST,
                round(wall, 3),
                round(1000 * _median(samples, "client_cpu_s") / n, 3),
                round(_median(samples, "connects") / n, 4),
                round(1000 * _median(samples, "hosts_cpu_s") / n, 3),
                f"{wall / base[design]:.2f}x" if base[design] else "",
                round(statistics.median(runs[n]["load"]), 1) if runs[n]["load"] else "",
            ])
    ratio = None
    floor = "n/a"
    if 16 in runs and 4096 in runs:
        w16, w4096 = _median(runs[16]["tree"], "wall_s"), _median(runs[4096]["tree"], "wall_s")
        ratio = w4096 / w16 if w16 and w4096 else None
        hosts_cpu, client_cpu = _median(runs[4096]["tree"], "hosts_cpu_s"), _median(runs[4096]["tree"], "client_cpu_s")
        floor = (f"at 4,096 VMs the simulated hosts used {hosts_cpu:.2f} s of CPU per exec (tree), so on this machine's "
                 f"{os.cpu_count()} cores the exec cannot take less than {hosts_cpu / os.cpu_count():.2f} s of wall time, "
                 f"which 256 real hosts would spread over their own cores ({hosts_cpu / 256 * 1000:.0f} ms each); the client's "
                 f"own CPU was {client_cpu:.2f} s (Python's start included) for 16 connections")
    report.write("fanout", "pcocc exec -n true fan-out to simulated VMs: relay tree vs direct TLS (wall: median of runs)",
                 ["design", "VMs", "hosts", "wall (s)", "client CPU per VM (ms)", "client connections per VM",
                  "simulated hosts' CPU per VM (ms)", "wall / wall(16)", "load average (1 min)"], rows,
                 {"ratio wall(4096) / wall(16), tree": f"{ratio:.2f} (target <= 4, issue 15)" if ratio else "n/a",
                  "where the 4,096-VM time goes": floor,
                  "what runs": "the real CLI (pcocc exec -j JOB -n true, a new process, SQLite store in a temporary PCOCC home) "
                               "against real ControlServers (mutual TLS on loopback, unix sockets in private dirs) serving a FAKE "
                               f"guest agent (FakeGuestAgentHandler: 'started' at once, the end after {AGENT_DELAY * 1000:g} ms); "
                               f"{PER_HOST} VMs per simulated host, the hosts in {args.workers} worker processes; tree width {relay.WIDTH}",
                  "client CPU": "user + system time of the CLI process (Python's start and imports included, about 0.2-0.4 s)",
                  "client connections": "connect() calls of the CLI process (the store is SQLite: no socket)",
                  "simulated hosts' CPU": "CPU time of every worker process during the exec (all VMs and relays: on this "
                                          "2-core machine it shares the cores with the client, where real hosts would each have their own)",
                  "reps": f"{args.reps} runs at 16 and 256 VMs, {args.reps_large} at 4,096 (the direct design: once, cut after {args.cap:g} s)",
                  "latency, relay vs direct (ms, medians of 7 alternated runs: the real ControlHandler and the unit tests' "
                  "fake local agent, the CLI's exec loop in process: what the relay adds, no CLI start, no guest)":
                      "; ".join(f"{k}: {statistics.median(v) * 1000:.0f}" for k, v in sorted(lat.items())) if lat else "not run",
                  "load average at the end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                  "runs": json.dumps({str(n): {d: [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if k != "stderr"}
                                                   if s else None for s in r[d]] for d in ("tree", "direct")} | {"load": r["load"], "hosts_start_s": r["hosts_start_s"]}
                                      for n, r in runs.items()} | {"latency_s": lat})})


def rewrite():
    """Renders bench/results/fanout.md (and .png) again from fanout.json's runs (e.g. after a
    change of the table's layout), with the default options' notes."""
    import report

    path = os.path.join(report.RESULTS, "fanout.json")
    with open(path) as f:
        data = json.load(f)
    saved = json.loads(data["runs"])
    lat = saved.pop("latency_s", {})
    runs = {int(n): r for n, r in saved.items()}
    args = argparse.Namespace(reps=5, reps_large=3, workers=4, cap=180.0)
    write(runs, args, sorted(runs), lat)
    with open(path) as f:  # the figures' date is the run's, not this rendering's
        new = json.load(f)
    rendered, new["date"] = new["date"], data["date"]
    with open(path, "w") as f:
        json.dump(new, f, indent=2)
    md = os.path.splitext(path)[0] + ".md"
    with open(md) as f:
        text = f.read()
    with open(md, "w") as f:
        f.write(text.replace(rendered, data["date"], 1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.stdin.readline()))
    elif sys.argv[1:] == ["--rewrite"]:
        rewrite()
    elif len(sys.argv) > 2 and sys.argv[1] == "--cli":
        cli(sys.argv[2], sys.argv[4:])
    else:
        main()
