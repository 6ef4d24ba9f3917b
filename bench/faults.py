"""Fault injection: N alloc/cancel cycles per backend, one fault each, and what is left after.

    .venv/bin/python bench/faults.py [--backend local|slurm|both] [--cycles 200] [--seed 1]

Each cycle starts a 2-VM cluster of the tiny image on an L3 ethernet network, injects
one fault drawn at random (seeded) from those that apply to the backend, checks what
the user must see (the checks below), cancels the cluster (and, under SLURM, runs
`pcocc internal setup cleanup` on every node as root, as the design relies on it),
then counts what is left of the cycle's cluster, per kind of object:

- processes: qemu and pcocc processes (VM processes, supervisors, node setups);
- files: run dirs, overlays (qcow2 files of run dirs), undo logs, dnsmasq files;
- network: taps and other devices named with the network's prefix, OVS bridges
  and ports, network namespaces, iptables rules, dnsmasq processes;
- store: live cluster keys, pool entries; host reservations (local);
- history: the "ended" records that say how clusters ended (kept 10 minutes by
  design) are counted apart, never as leftovers.

Something present right after the cancel that goes away within SETTLE seconds is
counted as "late" (slow, not leaked); what is still there after SETTLE is a
leftover, listed with the cycle in the JSON and the Markdown.

Faults, both backends: cancel during start, SIGKILL of one qemu (the cluster runs on
with that VM failed, `ps` shows it), SIGKILL of one VM process (`internal run`),
SIGKILL of the CLI (`alloc`, which holds its cluster, or `batch` during submission),
Ctrl-C of `batch --wait` (it stops waiting and says the cluster goes on). Local:
SIGKILL of the supervisor. SLURM: scancel during node setup, SIGKILL of the launcher
and of node setup, slurmd restarted, one member of the 3-member etcd killed.

The local backend runs in a network namespace of its own (with its own userspace
Open vSwitch), so that the bench neither sees nor disturbs the host's devices and
rules, nor tests that run a switch beside it. Every wait is a bounded poll of a
condition; everything started is stopped by pid, also on failure.

Results: bench/results/faults.md and faults.json (--out DIR elsewhere); a run of one
backend replaces that backend's section and keeps the other's.
"""

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests"))  # waiting.py, for the test helpers imported here

from pcocc.networks.gateway import netns_name, netns_tag  # noqa: E402 - the names node setup gives

RESULTS = HERE / "results"
START_TIMEOUT = 300  # s: a cluster of 2 tiny VMs under TCG on a loaded 2-core host
CHECK_TIMEOUT = 120  # s: for what a fault must lead to (a VM failed, a cluster ended)
SETTLE = 60  # s: what is still there this long after the cancel is a leftover
TPL = "tiny:\n  image: user:tiny\nnet:\n  inherits: tiny\n  resource-set: l3\n"
PREFIX = "fb"  # dev-prefix of the bench's network

LOCAL_FAULTS = ["cancel-during-start", "kill-qemu", "kill-vm-process", "kill-cli", "ctrl-c-batch-wait", "kill-supervisor"]
SLURM_FAULTS = ["cancel-during-start", "kill-qemu", "kill-vm-process", "kill-cli", "ctrl-c-batch-wait",
                "scancel-during-setup", "kill-launcher", "kill-node-setup", "restart-slurmd", "kill-etcd-member"]


class CheckFailed(Exception):
    """What the user must see after a fault was not there."""


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def poll(cond, timeout, what, interval=0.05):
    """cond()'s first true value within timeout seconds; CheckFailed naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def proc_environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def zombie_or_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def pids():
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def kill(pid, sig=signal.SIGKILL):
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.kill(pid, sig)


def stop(proc, timeout=10):
    """Stop a Popen we started (its whole session when it has one), and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL) if os.getpgid(proc.pid) == proc.pid else proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)

def ctrl_c_of_batch_wait(proc, rng):
    """Ctrl-C a `batch --wait` (proc) at a random moment once it printed its job id; check it
    stops waiting and says the cluster goes on, as sbatch would. (jobid, variant); CheckFailed."""
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise CheckFailed(f"batch --wait printed no job id: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}")
        jobid = int(line)
        time.sleep(rng.uniform(0, 3))
        waiting = proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=CHECK_TIMEOUT)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    if waiting and proc.returncode == 0 and took > 5:
        raise CheckFailed(f"batch --wait went on waiting after Ctrl-C ({took:.0f} s, then exit 0)")
    if proc.returncode not in (0, 130):
        raise CheckFailed(f"batch --wait ended with {proc.returncode} on Ctrl-C: {err.strip()}")
    if proc.returncode == 130 and f"cluster {jobid} goes on" not in err:
        raise CheckFailed(f"batch --wait's Ctrl-C does not say the cluster goes on: {err.strip()!r}")
    return jobid, "while waiting" if waiting else "after start"

def check_killed_part(bench, jobid, rank, field, vm, names_signal):
    """After vm<rank>'s process or qemu (field: "pid" or "qemu_pid") was killed: the VM is failed in
    ps with a reason (naming the SIGKILL when names_signal), the other VM and the cluster run on,
    and a killed VM process takes its qemu with it; then the cluster is cancelled. CheckFailed."""

    def failed_or_gone():
        j = bench.job_ps(jobid)
        return "gone" if j is None else (j if j["vm_states"].get(f"vm{rank}") == "failed" else None)

    job = poll(failed_or_gone, CHECK_TIMEOUT, f"vm{rank} failed in ps", interval=0.5)
    if job == "gone":
        raise CheckFailed(f"cluster {jobid} ended when vm{rank}'s {field} was killed: it must run on with that VM failed")
    if job["vm_states"].get(f"vm{1 - rank}") == "failed":
        raise CheckFailed(f"vm{1 - rank} failed too after vm{rank}'s {field} was killed: {job['errors']}")
    if not job["errors"].get(f"vm{rank}"):
        raise CheckFailed(f"ps gives no reason for vm{rank}'s failure")
    if names_signal and field == "pid" and "signal 9" not in job["errors"][f"vm{rank}"]:
        raise CheckFailed(f"vm{rank}'s reason does not name the SIGKILL: {job['errors'][f'vm{rank}']!r}")
    qemu = vm.get("qemu_pid") if field == "pid" else None
    if qemu:
        poll(lambda: zombie_or_gone(qemu), CHECK_TIMEOUT, f"vm{rank}'s qemu to die with its VM process")
    bench._cancel(jobid)




# --------------------------------------------------------------------------- tallies

class Tally:
    """Per fault kind: cycles, check failures, leftovers and late objects per kind of object."""

    def __init__(self):
        self.kinds = {}
        self.failures = []  # [{cycle, fault, error}]
        self.leaks = []  # [{cycle, fault, jobid, left: [...]}]
        self.cleaned = []  # the same, of what only `setup cleanup` removed (SLURM)

    def kind(self, fault):
        return self.kinds.setdefault(fault, {"cycles": 0, "check_failures": 0, "errors": 0, "leftovers": {}, "late": {}, "history": 0})

    def add(self, cycle, fault, jobid, error=None, check_failed=False, left=None, late=None, history=0, variant=None,
            by_cleanup=None):
        k = self.kind(fault)
        for what, items in (by_cleanup or {}).items():
            k.setdefault("by_cleanup", {})[what] = k.get("by_cleanup", {}).get(what, 0) + len(items)
        if by_cleanup:
            self.cleaned.append({"cycle": cycle, "fault": fault, "variant": variant, "jobid": jobid, "left": by_cleanup})
        k["cycles"] += 1
        k["history"] += history
        if variant:
            k.setdefault("variants", {}).setdefault(variant, 0)
            k["variants"][variant] += 1
        if error:
            k["check_failures" if check_failed else "errors"] += 1
            self.failures.append({"cycle": cycle, "fault": fault, "variant": variant, "jobid": jobid, "error": error})
        for what, items in (left or {}).items():
            k["leftovers"][what] = k["leftovers"].get(what, 0) + len(items)
        for what, items in (late or {}).items():
            k["late"][what] = k["late"].get(what, 0) + len(items)
        if left and any(left.values()):
            self.leaks.append({"cycle": cycle, "fault": fault, "variant": variant, "jobid": jobid,
                               "left": {w: i for w, i in left.items() if i}})

    def as_dict(self):
        return {"kinds": self.kinds, "failures": self.failures, "leaks": self.leaks, "cleaned": self.cleaned}


def settle(count):
    """(left, late): what count() finds SETTLE s after the cancel, and what it found at once but not then."""
    first = count()
    if not any(first.values()):
        return first, {}
    deadline = time.monotonic() + SETTLE
    now = first
    while any(now.values()) and time.monotonic() < deadline:
        time.sleep(1)
        now = count()
    late = {w: [i for i in items if i not in now.get(w, [])] for w, items in first.items()}
    return now, {w: i for w, i in late.items() if i}


# --------------------------------------------------------------------------- local backend

NETWORKS = f"""\
{{net}}:
  type: ethernet
  settings:
    dev-prefix: {PREFIX}
    network-layer: L3
    datapath-type: netdev
    int-network: 10.252.0.0/24
    ext-network: 10.253.0.0/24
    domain-name: faults.test
    manage-ip-forward: false
    reverse-nat:
      vm-port: 22
      min-host-port: 42400
      max-host-port: 42499
"""


class LocalBench:
    """A user's world for the local backend (tests/integration/local_site.py) inside a network
    namespace of its own with its own Open vSwitch; the cycles' clusters run there."""

    backend = "local"
    faults = LOCAL_FAULTS

    def __init__(self, workdir):
        from local_site import LocalSite, image_cache_dir
        from pcocc.images.build import build_image

        self.workdir = Path(workdir)
        self.procs = []
        self.netns = f"pcocc-faults-{os.getpid()}"
        image = build_image("tiny", None, image_cache_dir(), log=lambda line: log(line))
        self.site = LocalSite(self.workdir, image)
        etc = self.workdir / "etc"
        # named per bench: the namespaces node setup makes (pcocc-vm-JOB-NET) are host-wide
        self.net = f"fbnet{os.getpid()}"
        (etc / "networks.yaml").write_text(NETWORKS.format(net=self.net))
        (etc / "resources.yaml").write_text(f"default:\n  default: true\n  networks: []\nl3:\n  networks: [{self.net}]\n")
        self.site.write(".pcocc/templates.yaml", TPL)
        self.node_dir = self.workdir / "node"
        self.node_dir.mkdir()
        self.ovs_dir = self.workdir / "ovs"
        self.ovs_dir.mkdir()
        self.ovs_env = {"OVS_RUNDIR": str(self.ovs_dir), "OVS_LOGDIR": str(self.ovs_dir), "OVS_DBDIR": str(self.ovs_dir)}
        self.site.environ.update(self.ovs_env, PCOCC_NODE_STATE_DIR=str(self.node_dir))
        self.user = self.site.environ["USER"]
        self.pcocc_bin = str(self.site.environ["PATH"].split(":")[0] + "/pcocc")
        self._up()

    # -- the namespace and its switch
    def _up(self):
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.ns_made = True
        subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"], check=True)
        d = self.ovs_dir
        env = {**os.environ, **self.ovs_env}
        subprocess.run(["ovsdb-tool", "create", d / "conf.db", "/usr/share/openvswitch/vswitch.ovsschema"], check=True)
        # `ip netns exec` remounts /sys: OVS sees the namespace's own devices
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "ovsdb-server", d / "conf.db", f"--remote=punix:{d / 'db.sock'}",
             f"--unixctl={d / 'db.ctl'}", "-vconsole:off", f"--log-file={d / 'db.log'}"], env=env, start_new_session=True))
        poll(lambda: (d / "db.sock").exists(), 20, "ovsdb-server")
        subprocess.run(["ovs-vsctl", "--no-wait", "init"], env=env, check=True)
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "ovs-vswitchd", f"unix:{d / 'db.sock'}", f"--unixctl={d / 'vs.ctl'}",
             "-vconsole:off", f"--log-file={d / 'vs.log'}"], env=env, start_new_session=True))
        subprocess.run(["ovs-vsctl", "--timeout=60", "set", "Open_vSwitch", ".", "external_ids:faults=1"], env=env, check=True)

    def close(self):
        with contextlib.suppress(Exception):
            for job in self.ps():
                self.pcocc("cancel", "-j", job["jobid"], timeout=180)
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if getattr(self, "ns_made", False):
            # whatever still runs in the namespace was ours (qemu, dnsmasq): stop it by pid
            for pid in self._in_netns_pids():
                kill(pid)
            subprocess.run(["ip", "netns", "delete", self.netns], check=False)
        for ns in self._netns_list():
            if re.search(rf"-\d+-{self.net}{netns_tag(self.node_dir)}$", ns):
                subprocess.run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(self.site.run_dir, ignore_errors=True)

    def _in_netns_pids(self):
        try:
            ino = os.stat(f"/run/netns/{self.netns}").st_ino
        except OSError:
            return []
        out = []
        for pid in pids():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino == ino:
                    out.append(pid)
        return out

    # -- commands
    def argv(self, *args):
        return ["nsenter", f"--net=/run/netns/{self.netns}", self.pcocc_bin, *map(str, args)]

    def pcocc(self, *args, timeout=600):
        return subprocess.run(self.argv(*args), env=self.site.environ, capture_output=True, text=True,
                              timeout=timeout, cwd=self.site.root)

    def popen(self, *args, session=False):
        return subprocess.Popen(self.argv(*args), env=self.site.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.site.root, start_new_session=session)

    def ns(self, *argv):
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], env={**os.environ, **self.ovs_env},
                              capture_output=True, text=True, timeout=60).stdout

    def ps(self):
        r = self.pcocc("ps", "--json")
        if r.returncode != 0:
            raise CheckFailed(f"pcocc ps failed ({r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout)

    def job_ps(self, jobid):
        return next((j for j in self.ps() if int(j["jobid"]) == jobid), None)

    def items(self):
        return {k: json.loads(v) for k, v in self.site.store_items().items()}

    def record(self, jobid, suffix):
        return self.items().get(f"/pcocc/users/{self.user}/clusters/{jobid}/{suffix}")

    def submit(self, wait=False):
        r = self.pcocc("batch", "-m", "256", *(["--wait"] if wait else []), "net:2", timeout=START_TIMEOUT + 60)
        if r.returncode != 0:
            raise CheckFailed(f"batch failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.split()[0])

    def vm_with(self, jobid, field, rank):
        vm = self.record(jobid, f"vms/{rank}")
        return vm if vm and vm.get(field) and not zombie_or_gone(vm[field]) else None

    # -- one cycle
    def cycle(self, fault, rng):
        """Run one cycle; (jobid, variant). Raises CheckFailed when the user does not see what he must."""
        return getattr(self, "fault_" + fault.replace("-", "_"))(rng)

    def fault_cancel_during_start(self, rng):
        jobid = self.submit()
        when = rng.choice(["at once", "vm process", "qemu", "delay"])
        rank = rng.randrange(2)
        if when == "vm process":
            poll(lambda: self.vm_with(jobid, "pid", rank) or self._ended(jobid), START_TIMEOUT, f"vm{rank}'s process")
        elif when == "qemu":
            poll(lambda: self.vm_with(jobid, "qemu_pid", rank) or self._ended(jobid), START_TIMEOUT, f"vm{rank}'s qemu")
        elif when == "delay":
            time.sleep(rng.uniform(0, 3))
        r = self.pcocc("cancel", "-j", jobid)
        if r.returncode != 0:
            raise CheckFailed(f"cancel during start failed ({r.returncode}): {r.stderr.strip()}")
        if self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} still listed by ps after its cancel")
        return jobid, when

    def _ended(self, jobid):
        return f"/pcocc/users/{self.user}/history/{jobid}" in self.site.store_items()

    def _kill_vm_part(self, rng, field):
        jobid = self.submit()
        rank = rng.randrange(2)
        when = rng.choice(["starting", "running"])
        if when == "running":
            poll(lambda: (self.job_ps(jobid) or {}).get("vm_states", {}).get(f"vm{rank}") == "running",
                 START_TIMEOUT, f"vm{rank} running", interval=0.5)
        vm = poll(lambda: self.vm_with(jobid, field, rank), START_TIMEOUT, f"vm{rank}'s {field}", interval=0.02)
        kill(vm[field])
        check_killed_part(self, jobid, rank, field, vm, names_signal=True)
        return jobid, when

    def fault_kill_qemu(self, rng):
        return self._kill_vm_part(rng, "qemu_pid")

    def fault_kill_vm_process(self, rng):
        return self._kill_vm_part(rng, "pid")

    def fault_kill_cli(self, rng):
        variant = rng.choice(["alloc", "batch"])
        if variant == "alloc":
            script = self.workdir / "shell.sh"
            script.write_text("#!/bin/sh\necho ready\nexec sleep 600\n")
            script.chmod(0o755)
            proc = self.popen("alloc", "-m", "256", "-E", script, "net:2", session=True)
            try:
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0, 4))
                else:
                    poll(lambda: proc.poll() is not None or self._jobs(), START_TIMEOUT, "alloc's cluster")
                    time.sleep(rng.uniform(0, 2))
                jobids = self._jobs()
                os.killpg(proc.pid, signal.SIGKILL)  # alloc and the shell it runs
                proc.wait(30)
            finally:
                stop(proc)
            jobid = max(jobids) if jobids else self._last_jobid()
            # alloc held its cluster: it ends by itself (its supervisor sees the holder gone) or, killed
            # before it had a supervisor, at the next look (ps reclaims it): never does it run on
            poll(lambda: not self.job_ps(jobid), CHECK_TIMEOUT, f"cluster {jobid} to end with its alloc", interval=1)
            r = self.pcocc("cancel", "-j", jobid)
            if r.returncode == 0:
                raise CheckFailed(f"cluster {jobid} could still be cancelled after its alloc was killed")
            return jobid, variant
        proc = self.popen("batch", "-m", "256", "net:2")
        try:
            time.sleep(rng.uniform(0, 2.5))
            proc.kill()
            proc.wait(30)
        finally:
            stop(proc)
        jobid = self._last_jobid()
        # submitted or not, nothing may run hidden: whatever shows in ps is cancelled
        self._cancel(jobid, must_exist=False)
        return jobid, variant

    def _jobs(self):
        prefix = f"/pcocc/users/{self.user}/clusters/"
        return sorted({int(k[len(prefix):].split("/")[0]) for k in self.site.store_items() if k.startswith(prefix)})

    def _last_jobid(self):
        return int(self.site.store_items().get(f"/pcocc/users/{self.user}/next-jobid") or 0)

    def _live_keys(self, jobid):
        return [k for k in self.site.store_items() if f"/clusters/{jobid}/" in k]

    def fault_ctrl_c_batch_wait(self, rng):
        jobid, variant = ctrl_c_of_batch_wait(self.popen("batch", "-m", "256", "--wait", "net:2"), rng)
        if not self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} is gone after Ctrl-C of batch --wait")
        self._cancel(jobid)
        return jobid, variant

    def fault_kill_supervisor(self, rng):
        jobid = self.submit()
        when, rank = rng.choice(["at once", "starting", "running"]), rng.randrange(2)
        if when == "starting":
            poll(lambda: self.vm_with(jobid, "pid", rank), START_TIMEOUT, f"vm{rank}'s process", interval=0.02)
        elif when == "running":
            poll(lambda: all(s == "running" for s in (self.job_ps(jobid) or {}).get("vm_states", {"x": 0}).values()),
                 START_TIMEOUT, "both VMs running", interval=0.5)
        info = self.record(jobid, "info")
        vms = [self.record(jobid, f"vms/{r}") or {} for r in (0, 1)]
        kill(info["supervisor"])
        # VM processes and qemus go by themselves (parent-death signals), before anyone asks
        for vm in vms:
            for field in ("pid", "qemu_pid"):
                if vm.get(field):
                    poll(lambda p=vm[field]: zombie_or_gone(p), CHECK_TIMEOUT, f"{vm['name']}'s {field} to die with the supervisor")
        if self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} still listed by ps once its supervisor was killed")
        return jobid, when

    def _cancel(self, jobid, must_exist=True):
        r = self.pcocc("cancel", "-j", jobid)
        if r.returncode != 0 and (must_exist or "no virtual cluster" not in r.stderr):
            raise CheckFailed(f"cancel of {jobid} failed ({r.returncode}): {r.stderr.strip()}")
        if self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} still listed by ps after its cancel")

    def cleanup_after(self, jobid):
        """Make sure the next cycle starts clean (a failed check may leave its cluster running)."""
        with contextlib.suppress(Exception):
            for job in self.ps():
                self.pcocc("cancel", "-j", job["jobid"], timeout=180)

    # -- what is left
    def count(self, jobid):
        run = self.site.run_dir
        out = {"processes": [], "run dirs": [], "overlays": [], "devices": [], "ovs bridges": [], "ovs ports": [],
               "netns": [], "iptables rules": [], "dnsmasq": [], "undo logs": [], "store keys": [],
               "pool entries": [], "reservations": []}
        tag = str(run).encode()
        for pid in pids():
            cmd = proc_cmdline(pid)
            if not cmd or zombie_or_gone(pid):
                continue
            if cmd.split(b"\0")[0].endswith(b"dnsmasq") and f"{self.node_dir}/dnsmasq-{jobid}-".encode() in cmd:
                out["dnsmasq"].append(f"dnsmasq {pid}")
            elif tag in cmd or b"PCOCC_RUN_DIR=" + tag in proc_environ(pid):
                out["processes"].append(f"{pid} " + cmd.replace(b"\0", b" ")[:120].decode(errors="replace"))
        if run.exists():
            out["run dirs"] = [str(p) for p in run.glob("job_*")]
            out["overlays"] = [str(p) for p in run.glob("job_*/**/*.qcow2")]
        names = re.compile(rf"\b{PREFIX}[btxgh]{jobid}(?:_\w+)?\b")
        out["devices"] = sorted(set(names.findall(self.ns("ip", "-o", "link"))))
        out["ovs bridges"] = [b for b in self.ns("ovs-vsctl", "--timeout=30", "list-br").split() if names.fullmatch(b)]
        for br in self.ns("ovs-vsctl", "--timeout=30", "list-br").split():
            out["ovs ports"] += [f"{br}:{p}" for p in self.ns("ovs-vsctl", "--timeout=30", "list-ports", br).split() if names.fullmatch(p)]
        out["netns"] = [n for n in self._netns_list() if n.endswith(f"-{jobid}-{self.net}{netns_tag(self.node_dir)}")]
        idle = not list(self.node_dir.glob("undo-*"))
        for table in ("filter", "nat"):
            rules = self.ns("iptables", "-w", "-t", table, "-S")
            out["iptables rules"] += [f"{table}: {l}" for l in rules.splitlines()
                                      if f'"pcocc job {jobid}"' in l or (idle and "PCOCC-FORWARD" in l)]
        out["undo logs"] = [p.name for p in self.node_dir.glob(f"undo-{jobid}.*")] + \
                           [p.name for p in self.node_dir.glob(f"dnsmasq-{jobid}-*")]
        items = self.items()
        out["store keys"] = [k for k in items if "/clusters/" in k]
        for key, value in items.items():
            if key.startswith("/pcocc/global/pools/"):
                out["pool entries"] += [f"{key}:{i}={o}" for i, o in pool_entries(value)]
        from pcocc.batch.hostres import HostReservations

        out["reservations"] = list(HostReservations(str(self.site.reservations)).mine())
        return out

    def history(self, jobid):
        return int(self._ended(jobid))

    def _netns_list(self):
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def pool_entries(value):
    """[(id, owner)] of a pool's value: one key per pool holding {id: owner}, or one key per id."""
    if isinstance(value, dict):
        return [(i, o) for i, o in value.items() if o is not None]
    return [("", value)] if value is not None else []


# --------------------------------------------------------------------------- SLURM backend

def slurm_net(net, prefix, mac="52:54:00:7a", int_network="10.82.0.0/24", ext_network="10.83.0.0/24",
              domain="faults.test", host_ports=(41000, 41999)):
    """networks.yaml text of a bench's own L3 network (its addresses, MACs and ports apart from
    other benches', which may run beside it)."""
    return f"""\
{net}:
  type: ethernet
  settings:
    dev-prefix: {prefix}
    network-layer: L3
    datapath-type: netdev
    mac-prefix: '{mac}'
    int-network: {int_network}
    ext-network: {ext_network}
    domain-name: {domain}
    reverse-nat:
      vm-port: 22
      min-host-port: {host_ports[0]}
      max-host-port: {host_ports[1]}
"""
SPREFIX = "fq"  # dev-prefix of the bench's network on the SLURM nodes


class SlurmBench:
    """The project's test cluster (pcocc.testcluster: slurmctld, one slurmd per node in its netns,
    OVS per node, the SPANK plugin), its store moved to a 3-member etcd (pcocc.testcluster.etcd3)
    on addresses of the cluster's bridge, a network of the bench's own (L3, VXLAN between the
    nodes; its name makes the host-wide namespaces of its jobs ours), and an unprivileged user."""

    backend = "slurm"
    faults = SLURM_FAULTS

    def __init__(self, workdir, nodes=2):
        from local_site import image_cache_dir
        from pcocc.images.build import build_image
        from pcocc.testcluster import TestCluster

        self.workdir = Path(workdir)
        self.etcd = None
        self.extra = []  # Popen of daemons we (re)started: slurmd after a restart
        self.cleanup_runs = []
        self.etcd_kills = 0
        image = build_image("tiny", None, image_cache_dir(), log=lambda line: log(line))
        self.tc = TestCluster(f"/tmp/pcocc-tc-faults-{os.getpid()}", nodes=nodes, log=log)
        self.tc.up()
        try:
            self._etcd3()
            self.net = f"fq{self.tc.id}"
            conf = Path(self.tc.env["PCOCC_SYSTEM_CONF_DIR"])
            with open(conf / "networks.yaml", "a") as f:
                f.write(slurm_net(self.net, SPREFIX))
            with open(conf / "resources.yaml", "a") as f:
                f.write(f"fbl3:\n  networks: [{self.net}]\n")
            entry = self.tc.add_user()
            self.tc.user = entry.pw_name
            from test_slurm_cluster import SlurmSite

            tpl = "tiny:\n  image: user:tiny\nnet:\n  inherits: tiny\n  resource-set: fbl3\n"
            self.site = SlurmSite.with_image(self.tc, entry.pw_name, image, "repo", tpl)
            self.user, self.pw = entry.pw_name, entry
        except BaseException:
            self.close()
            raise

    CANCEL_TIMEOUT = 180  # seconds close() gives the clusters left to end

    def _etcd3(self, auth=True):
        """Three etcd members on three new addresses of the cluster's bridge (one client port, as a
        production batch.yaml lists several hosts), authentication on (off with auth=False:
        etcd-auth-type none), and pcocc's config moved to them."""
        import ipaddress

        from pcocc.store.etcd import EtcdStore
        from pcocc.store.etcdauth import enable_auth
        from pcocc.testcluster.etcd3 import Etcd3, free_port

        L = self.tc.layout
        hosts = [str(ipaddress.ip_address(L.host_ip) + 200 + i) for i in range(3)]
        added = Etcd3.add_addresses(hosts, L.bridge, L.prefixlen)
        self.etcd = Etcd3(self.workdir, hosts=hosts, client_port=free_port(L.host_ip), log=log)
        self.etcd.own_addresses(added)
        self.etcd.start()
        conf = Path(self.tc.env["PCOCC_SYSTEM_CONF_DIR"])
        if auth:
            password = (conf / "etcd-password").read_text().strip()
            store = EtcdStore(self.etcd.endpoints)
            try:
                enable_auth(store, password)
            finally:
                store.close()
        st = self.etcd.batch_settings()
        text = (conf / "batch.yaml").read_text()
        text = re.sub(r"  etcd-servers: .*\n", f"  etcd-servers: {json.dumps(st['etcd-servers'])}\n", text)
        text = re.sub(r"  etcd-client-port: .*\n", f"  etcd-client-port: {st['etcd-client-port']}\n", text)
        if not auth:
            text = re.sub(r"  etcd-auth-type: .*\n", "  etcd-auth-type: none\n", text)
        (conf / "batch.yaml").write_text(text)

    def close(self):
        with contextlib.suppress(Exception):
            self.site.cancel_all(timeout=self.CANCEL_TIMEOUT)
        with contextlib.suppress(Exception):
            self.tc.down()
        for p in self.extra:
            stop(p)
        if self.etcd:
            self.etcd.close()

    def notes(self):
        return (f"Test cluster of {len(self.tc.node_names)} nodes, L3 network with VXLAN, store on a 3-member etcd; "
                f"`pcocc internal setup cleanup` ran on every node after each cycle.")

    # -- commands
    def env(self):
        return {**os.environ, **self.tc.env, "HOME": str(self.site.home), "USER": self.user,
                "PATH": f"{Path(self.pcocc_bin).parent}:/usr/bin:/bin:/usr/sbin:/sbin"}

    @property
    def pcocc_bin(self):
        from local_site import PCOCC

        return str(PCOCC)

    def pcocc(self, *args, timeout=600):
        return self.site.pcocc(*args, timeout=timeout)

    def popen(self, *args, session=True):
        return subprocess.Popen([self.pcocc_bin, *map(str, args)], env=self.env(), user=self.pw.pw_uid, group=self.pw.pw_gid,
                                extra_groups=[], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=self.site.home, start_new_session=session)

    def ps(self):
        r = self.pcocc("ps", "--json", timeout=120)
        if r.returncode != 0:
            raise CheckFailed(f"pcocc ps failed ({r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout)

    def job_ps(self, jobid):
        return next((j for j in self.ps() if int(j["jobid"]) == jobid), None)

    def squeue(self):
        r = self.tc.run(["squeue", "-h", "-o", "%i %u %T %j"], timeout=60)
        return [line.split() for line in r.stdout.splitlines()]

    def in_queue(self, jobid):
        return any(j[0] == str(jobid) for j in self.squeue())

    def keys(self, prefix):
        return self.site.keys(prefix)

    def record(self, jobid, suffix):
        return self.keys(f"/pcocc/users/{self.user}/clusters/{jobid}/{suffix}").get(
            f"/pcocc/users/{self.user}/clusters/{jobid}/{suffix}")

    def submit(self):
        r = self.pcocc("batch", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "net:2", timeout=START_TIMEOUT)
        if r.returncode != 0:
            raise CheckFailed(f"batch failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.split()[0])

    def vm_with(self, jobid, field, rank):
        vm = self.record(jobid, f"vms/{rank}")
        return vm if vm and vm.get(field) and not zombie_or_gone(vm[field]) else None

    def last_jobid(self):
        r = self.tc.run(["squeue", "-h", "-u", self.user, "-o", "%i"], timeout=60)
        ids = [int(x) for x in r.stdout.split() if x.isdigit()]
        if ids:
            return max(ids)
        r = self.tc.run(["sacct", "-n", "-X", "-o", "JobID"], timeout=60)  # no accounting here: usually empty
        ids = [int(x) for x in r.stdout.split() if x.isdigit()]
        return max(ids) if ids else getattr(self, "_last", None)

    def wait_running(self, jobid, ranks=(0, 1)):
        poll(lambda: all((self.job_ps(jobid) or {}).get("vm_states", {}).get(f"vm{r}") == "running" for r in ranks),
             START_TIMEOUT, f"job {jobid}'s VMs running", interval=1)

    def setup_procs(self, jobid, what=(b"setup\0create",)):
        """pids of `pcocc internal setup create` (or what) of the job, on any node."""
        out = []
        for pid in pids():
            cmd = proc_cmdline(pid)
            # the plugin runs this cluster's pcocc (a link under its base): never another cluster's process
            if str(self.tc.base).encode() in cmd and any(w in cmd for w in what) and \
                    f"--jobid\0{jobid}\0".encode() in cmd + b"\0" and not zombie_or_gone(pid):
                out.append(pid)
        return out

    def launcher_pid(self, jobid):
        for pid in pids():
            cmd = proc_cmdline(pid)
            if b"internal\0launcher" in cmd and not cmd.split(b"\0")[0].endswith(b"srun") and \
                    f"SLURM_JOB_ID={jobid}".encode() in proc_environ(pid) and not zombie_or_gone(pid):
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{pid}").st_uid == self.pw.pw_uid:  # our user's: not another cluster's job
                        return pid
        return None

    # -- one cycle
    def cycle(self, fault, rng):
        self._last = None
        return getattr(self, "fault_" + fault.replace("-", "_"))(rng)

    def _ended_in_ps(self, jobid):
        return self.job_ps(jobid) is None

    def fault_cancel_during_start(self, rng):
        jobid = self._last = self.submit()
        when = rng.choice(["at once", "node setup", "vm process", "qemu"])
        rank = rng.randrange(2)
        ended = lambda: not self.in_queue(jobid)
        if when == "node setup":
            poll(lambda: self.setup_procs(jobid) or self.record(jobid, f"vms/{rank}") or ended(), START_TIMEOUT, "node setup", interval=0.02)
        elif when == "vm process":
            poll(lambda: self.vm_with(jobid, "pid", rank) or ended(), START_TIMEOUT, f"vm{rank}'s process", interval=0.1)
        elif when == "qemu":
            poll(lambda: self.vm_with(jobid, "qemu_pid", rank) or ended(), START_TIMEOUT, f"vm{rank}'s qemu", interval=0.1)
        self._cancel(jobid)
        return jobid, when

    def _cancel(self, jobid, must_exist=True):
        r = self.pcocc("cancel", "-j", jobid, timeout=300)
        if r.returncode != 0 and (must_exist or "no virtual cluster" not in r.stderr):
            raise CheckFailed(f"cancel of {jobid} failed ({r.returncode}): {r.stderr.strip()}")
        poll(lambda: not self.in_queue(jobid), CHECK_TIMEOUT, f"job {jobid} to leave the queue", interval=0.5)
        if self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} still listed by ps after its cancel")

    def _kill_vm_part(self, rng, field):
        jobid = self._last = self.submit()
        rank = rng.randrange(2)
        when = rng.choice(["starting", "running"])
        if when == "running":
            self.wait_running(jobid, (rank,))
        vm = poll(lambda: self.vm_with(jobid, field, rank), START_TIMEOUT, f"vm{rank}'s {field}", interval=0.05)
        kill(vm[field])
        check_killed_part(self, jobid, rank, field, vm, names_signal=False)
        return jobid, when

    def fault_kill_qemu(self, rng):
        return self._kill_vm_part(rng, "qemu_pid")

    def fault_kill_vm_process(self, rng):
        return self._kill_vm_part(rng, "pid")

    def fault_kill_cli(self, rng):
        variant = rng.choice(["alloc", "batch"])
        if variant == "alloc":
            script = self.site.home / "shell.sh"
            script.write_text("#!/bin/sh\necho ready\nexec sleep 600\n")
            script.chmod(0o755)
            os.chown(script, self.pw.pw_uid, self.pw.pw_gid)
            proc = self.popen("alloc", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "-E", script, "net:2")
            delay = rng.uniform(0, 6)
        else:
            proc = self.popen("batch", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "net:2")
            delay = rng.uniform(0, 2)
        try:
            time.sleep(delay)
            kill(proc.pid)  # the CLI only: what it started (salloc) is on its own
            proc.wait(30)
        finally:
            stop(proc)
        jobid = self._last = self.last_jobid()
        if jobid is not None and self.in_queue(jobid):
            self._cancel(jobid, must_exist=False)
        return jobid, f"{variant} after {delay:.1f} s"

    def fault_ctrl_c_batch_wait(self, rng):
        proc = self.popen("batch", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "--wait", "net:2", session=False)
        jobid, variant = ctrl_c_of_batch_wait(proc, rng)
        self._last = jobid
        if not self.in_queue(jobid):
            raise CheckFailed(f"job {jobid} is gone after Ctrl-C of batch --wait")
        # its record is written by the launcher, inside the allocation: ps may list it a little later
        poll(lambda: self.job_ps(jobid) or not self.in_queue(jobid), CHECK_TIMEOUT, f"ps to list cluster {jobid}", interval=1)
        if not self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} ended after Ctrl-C of batch --wait")
        self._cancel(jobid)
        return jobid, variant

    def fault_scancel_during_setup(self, rng):
        jobid = self._last = self.submit()
        poll(lambda: self.setup_procs(jobid) or not self.in_queue(jobid), START_TIMEOUT, "node setup", interval=0.01)
        time.sleep(rng.uniform(0, 0.5))
        self.tc.run(["scancel", str(jobid)], timeout=60)
        poll(lambda: not self.in_queue(jobid), CHECK_TIMEOUT, f"job {jobid} to leave the queue", interval=0.5)
        if self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} still listed by ps after scancel")
        return jobid, None

    def fault_kill_launcher(self, rng):
        jobid = self._last = self.submit()
        when = rng.choice(["starting", "running"])
        if when == "running":
            self.wait_running(jobid)
        pid = poll(lambda: self.launcher_pid(jobid), START_TIMEOUT, "the launcher", interval=0.05)
        kill(pid)
        # the job's body is gone: the job ends, its VMs with it
        poll(lambda: not self.in_queue(jobid), CHECK_TIMEOUT, f"job {jobid} to end with its launcher", interval=0.5)
        if self.job_ps(jobid):
            raise CheckFailed(f"cluster {jobid} still listed by ps once its job ended")
        return jobid, when

    def fault_kill_node_setup(self, rng):
        jobid = self._last = self.submit()
        found = poll(lambda: self.setup_procs(jobid) or (not self.in_queue(jobid) and "ended"), START_TIMEOUT,
                     "node setup", interval=0.005)
        if found == "ended":
            raise CheckFailed(f"job {jobid} ended before its node setup was seen")
        time.sleep(rng.uniform(0, 0.3))
        for pid in self.setup_procs(jobid)[:1]:
            kill(pid)
        # the start fails (or the setup had finished): either way ps says so, and nothing hangs

        def outcome():
            j = self.job_ps(jobid)
            if j is None:
                return "ended"
            states = j["vm_states"].values()
            if any(s == "failed" for s in states):
                return "failed"
            if all(s == "running" for s in states):
                return "running"
            return None

        got = poll(outcome, START_TIMEOUT, f"job {jobid} to fail, end or run after its node setup was killed", interval=1)
        if self.in_queue(jobid):
            self._cancel(jobid, must_exist=False)
        return jobid, got

    def fault_restart_slurmd(self, rng):
        from pcocc.testcluster import slurm as tc_slurm
        from pcocc.testcluster.cluster import _entry, _pid
        from pcocc.testcluster.state import State

        jobid = self._last = self.submit()
        when = rng.choice(["starting", "running"])
        if when == "running":
            self.wait_running(jobid)
        else:
            time.sleep(rng.uniform(0, 3))
        node = rng.choice(self.tc.node_names)
        state = State.load(self.tc.base)
        pid = _pid(_entry(state, f"slurmd:{node}"), self.tc.base)
        if pid:
            kill(pid)
            poll(lambda: zombie_or_gone(pid), 30, f"slurmd of {node} to die")
        self.extra.append(tc_slurm.start_node(state, self.tc.base, self.tc.layout, node, self.tc.ovs))
        poll(lambda: tc_slurm.node_states(self.tc.base).get(node, "").rstrip("*") in ("idle", "allocated", "mixed", "completing"),
             CHECK_TIMEOUT, f"{node} back in SLURM", interval=0.5)
        if when == "running":  # the VMs run on: slurmstepd outlives slurmd
            job = self.job_ps(jobid)
            if not job or any(s != "running" for s in job["vm_states"].values()):
                raise CheckFailed(f"job {jobid}'s VMs did not run on through slurmd's restart on {node}: {job}")
        self._cancel(jobid, must_exist=False)
        return jobid, f"{when} {node}"

    def fault_kill_etcd_member(self, rng):
        member = rng.randrange(3)
        leader = self.etcd.leader()
        when = rng.choice(["before submit", "starting"])
        try:
            if when == "before submit":
                self.etcd.kill(member)
                jobid = self._last = self.submit()
            else:
                jobid = self._last = self.submit()
                time.sleep(rng.uniform(0, 4))
                self.etcd.kill(member)
            self.etcd_kills += 1
            self.wait_running(jobid)  # the cluster starts with 2 of 3 members
            self._cancel(jobid)
        finally:
            if not self.etcd.members[member].pid:
                self.etcd.restart(member)
        return jobid, f"{when}, {'leader' if member == leader else 'follower'}"

    def cleanup_after(self, jobid):
        """Cancel what a failed check left running; wait until SLURM forgets the job."""
        with contextlib.suppress(Exception):
            mine = [j[0] for j in self.squeue() if j[1] == self.user]
            for j in mine:
                self.tc.run(["scancel", j], timeout=60)
            poll(lambda: not [j for j in self.squeue() if j[0] in mine], 180, "jobs to end", interval=0.5)

    # -- what is left
    def count(self, jobid):
        """What of job `jobid` is on the nodes and in the store, by kind of object."""
        from leftovers import dnsmasq_pids, pool_owners, run_dir

        tc = self.tc
        base, conf = str(tc.base).encode(), tc.env["PCOCC_SYSTEM_CONF_DIR"].encode()
        out = {"processes": [], "run dirs": [], "overlays": [], "devices": [], "ovs bridges": [], "ovs ports": [],
               "netns": [], "iptables rules": [], "dnsmasq": [], "undo logs": [], "store keys": [],
               "pool entries": [], "spank markers": []}
        for pid in pids():
            cmd = proc_cmdline(pid)
            if not cmd or zombie_or_gone(pid) or cmd.split(b"\0")[0].endswith(b"srun"):
                continue
            env = proc_environ(pid)
            try:  # ours: run by the bench's user, or by root for its test cluster (other clusters have the same job ids)
                ours = os.stat(f"/proc/{pid}").st_uid == self.pw.pw_uid or base in cmd or \
                    b"PCOCC_SYSTEM_CONF_DIR=" + conf in env
            except OSError:
                continue
            if not ours:
                continue
            if (b"qemu-system" in cmd and f"/job_{jobid}/".encode() in cmd) or (
                    b"pcocc" in cmd and b"internal" in cmd and (f"SLURM_JOB_ID={jobid}".encode() in env
                                                                or f"--jobid\0{jobid}\0".encode() in cmd + b"\0")):
                out["processes"].append(f"{pid} " + cmd.replace(b"\0", b" ")[:100].decode(errors="replace"))
        out["dnsmasq"] = [f"dnsmasq {p}" for p in dnsmasq_pids(jobid, [tc.node_state_dir(n) for n in tc.node_names])]
        rd = run_dir(self.site, jobid)
        if os.path.lexists(rd):
            out["run dirs"].append(str(rd))
            out["overlays"] = [str(p) for p in Path(rd).glob("**/*.qcow2")]
        names = re.compile(rf"\b{SPREFIX}[btxgh]{jobid}(?:_\w+)?\b")
        for node in tc.node_names:
            ovs = lambda *a: tc.onnode(node, ["ovs-vsctl", "--timeout=30", *a], timeout=60).stdout
            brs = ovs("list-br").split()
            out["ovs bridges"] += [f"{node}: {b}" for b in brs if names.fullmatch(b)]
            for br in brs:
                out["ovs ports"] += [f"{node}: {br}:{p}" for p in ovs("list-ports", br).split() if names.fullmatch(p)]
            links = tc.onnode(node, ["ip", "-o", "link"], timeout=60).stdout
            out["devices"] += [f"{node}: {d}" for d in sorted(set(names.findall(links)))]
            sd = Path(tc.node_state_dir(node))
            idle = not list(sd.glob("undo-*"))
            for table in ("filter", "nat"):
                rules = tc.onnode(node, ["iptables", "-w", "-t", table, "-S"], timeout=60).stdout
                out["iptables rules"] += [f"{node}: {table}: {l}" for l in rules.splitlines()
                                          if f'"pcocc job {jobid}"' in l or (idle and "PCOCC-FORWARD" in l)]
            out["undo logs"] += [f"{node}: {p.name}" for p in sd.glob("*")
                                 if p.name.startswith((f"undo-{jobid}.", f"dnsmasq-{jobid}-"))]
            out["spank markers"] += [f"{node}: {p.name}" for p in sd.glob(f"spank-{jobid}.*")]
            out["netns"] += [n for n in os.listdir("/run/netns") if n == netns_name(jobid, self.net, node, sd)] \
                if os.path.isdir("/run/netns") else []
        out["store keys"] = [k for k in self.keys(f"/pcocc/users/{self.user}/clusters/{jobid}/")]
        out["pool entries"] = [str(o) for o in pool_owners(self) if str(o).startswith(f"{jobid}:")]
        return out

    def history(self, jobid):
        return len(self.keys(f"/pcocc/users/{self.user}/history/{jobid}"))

    def setup_cleanup(self):
        """`pcocc internal setup cleanup` on every node, as root (what an admin runs after a crash)."""
        for node in self.tc.node_names:
            argv = [*self.tc.enter_argv(node), self.tc.pcocc, "internal", "setup", "cleanup"]
            r = subprocess.run(argv, env={**os.environ, **self.tc.env, **self.tc.node_env(node)}, capture_output=True,
                               text=True, timeout=300)
            if r.returncode != 0:
                log(f"setup cleanup on {node}: {r.stderr.strip()}")

    def scrub(self, left):
        self.setup_cleanup()
        for item in left.get("processes", []) + left.get("dnsmasq", []):
            kill(int(item.split()[-1] if item.startswith("dnsmasq") else item.split()[0]))
        for d in left.get("run dirs", []):
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- driver

def run(bench, cycles, seed, tally, faults=None, each=False, progress=None):
    rng = random.Random(seed)
    faults = faults or bench.faults
    for n in range(1, cycles + 1):
        fault = rng.choice(faults)
        if each:  # every kind in turn (the draws of timings stay seeded)
            fault = faults[(n - 1) % len(faults)]
        crng = random.Random(rng.random())
        started = time.monotonic()
        jobid, variant, error, check_failed = None, None, None, False
        try:
            jobid, variant = bench.cycle(fault, crng)
        except CheckFailed as exc:
            error, check_failed = str(exc), True
        except Exception as exc:  # noqa: BLE001 - a bench error is counted, and the next cycle runs
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        if jobid is None:
            with contextlib.suppress(Exception):
                jobid = bench.last_jobid()
        bench.cleanup_after(jobid)
        left, late = settle(lambda: bench.count(jobid)) if jobid is not None else ({}, {})
        by_cleanup = {}
        if hasattr(bench, "setup_cleanup"):  # what the teardown left, that `setup cleanup` removes
            bench.setup_cleanup()
            by_cleanup = {w: i for w, i in left.items() if i}
            left = bench.count(jobid) if jobid is not None else {}
        tally.add(n, fault, jobid, error=error, check_failed=check_failed, left=left, late=late, by_cleanup=by_cleanup,
                  history=bench.history(jobid) if jobid is not None else 0, variant=variant)
        nleft = sum(len(v) for v in left.values())
        log(f"{bench.backend} cycle {n}/{cycles} {fault} ({variant}) job {jobid}: {time.monotonic() - started:.1f} s, "
            f"{nleft} left{' ' + json.dumps({k: v for k, v in left.items() if v}) if nleft else ''}"
            f"{', CHECK FAILED: ' + error if error else ''}")
        if nleft:  # the next cycle must start clean, or every later count would carry this one
            bench.scrub(left)
        if progress:
            progress()


LocalBench.last_jobid = LocalBench._last_jobid


def _scrub_local(self, left):
    """Remove by hand what a cycle left (after it was counted), so that the next cycle starts clean."""
    for item in left.get("processes", []) + left.get("dnsmasq", []):
        kill(int(item.split()[0] if item[0].isdigit() else item.split()[1]))
    for d in left.get("run dirs", []):
        shutil.rmtree(d, ignore_errors=True)
    for ns in left.get("netns", []):
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    env = {**os.environ, **self.ovs_env}
    for br in left.get("ovs bridges", []):
        subprocess.run(["ovs-vsctl", "--timeout=30", "--if-exists", "del-br", br], env=env, check=False)
    for port in left.get("ovs ports", []):
        br, p = port.split(":", 1)
        subprocess.run(["ovs-vsctl", "--timeout=30", "--if-exists", "del-port", br, p], env=env, check=False)
    for dev in left.get("devices", []):
        self.ns("ip", "link", "delete", dev)
    for rule in left.get("iptables rules", []):
        table, spec = rule.split(": ", 1)
        if spec.startswith("-A "):
            self.ns("sh", "-c", f"iptables -w -t {table} -D {spec[3:]}")
    for name in left.get("undo logs", []):
        (self.node_dir / name).unlink(missing_ok=True)
    if left.get("store keys") or left.get("pool entries") or left.get("reservations"):
        log("store keys, pool entries or reservations left: later cycles may count them again")


LocalBench.scrub = _scrub_local


def write_results(out_dir, backend, tally, meta):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "faults.json"
    data = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
    data.setdefault("backends", {})[backend] = {**meta, **tally.as_dict()}
    data["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / "faults.md").write_text(markdown(data))
    return data


OBJECTS = ["processes", "run dirs", "overlays", "devices", "ovs bridges", "ovs ports", "netns", "iptables rules",
           "dnsmasq", "undo logs", "store keys", "pool entries", "reservations", "spank markers"]


def markdown(data):
    lines = ["# Fault injection: alloc/cancel cycles with one fault each", "",
             "Written by `bench/faults.py` (see its docstring for the faults, the checks and what is counted).",
             "A leftover is an object of the cycle's cluster still there "
             f"{SETTLE} s after the cancel; *late* ones were there right after it and went away within that time.",
             "*history* counts the `history/` records that say how a cluster ended (pcocc history, kept 7 days by design), apart.",
             "*pool entries* counts the cycle's ids still held in any pool. No pool can hold an id twice: each id is a key "
             "of its own, created only by a transaction that expects it absent (`pcocc.allocator.Pool`); "
             "`tests/unit/test_allocator.py::test_32_processes_allocate_unique_ids` proves it under contention, on SQLite and on etcd.", ""]
    for backend, b in sorted(data.get("backends", {}).items()):
        kinds = b["kinds"]
        lines += [f"## {backend} backend", "",
                  f"{b.get('date', '')}: {b.get('cycles_run', 0)} cycles (of {b.get('cycles', 0)} asked), seed {b.get('seed')}, "
                  f"{b.get('machine', '')}; {b.get('duration_s', 0):.0f} s. {b.get('notes', '')}", ""]
        objs = [o for o in OBJECTS if o != "spank markers" or backend == "slurm"]
        lines.append("| fault | cycles | check failures | bench errors | " + " | ".join(objs) + " | late | history |")
        lines.append("|" + "---|" * (len(objs) + 6))
        total = {"cycles": 0, "check_failures": 0, "errors": 0, "late": 0, "history": 0, **{o: 0 for o in objs}}
        for fault in sorted(kinds):
            k = kinds[fault]
            late = sum(k["late"].values())
            row = [fault, k["cycles"], k["check_failures"], k["errors"], *[k["leftovers"].get(o, 0) for o in objs], late, k["history"]]
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
            for key in ("cycles", "check_failures", "errors", "history"):
                total[key] += k[key]
            total["late"] += late
            for o in objs:
                total[o] += k["leftovers"].get(o, 0)
        lines.append("| **all** | " + " | ".join(str(total[c]) for c in ["cycles", "check_failures", "errors", *objs, "late", "history"]) + " |")
        variants = {f: k.get("variants") for f, k in kinds.items() if k.get("variants")}
        if variants:
            lines += ["", "Variants drawn: " + "; ".join(f"{f}: " + ", ".join(f"{v} {n}" for v, n in sorted(vs.items()))
                                                      for f, vs in sorted(variants.items()))]
        if b["failures"]:
            lines += ["", "Check failures and bench errors:", ""]
            lines += [f"- cycle {f['cycle']} {f['fault']} ({f.get('variant')}) job {f['jobid']}: {f['error'].splitlines()[0]}"
                      for f in b["failures"][:40]]
        cleaned = {f: k["by_cleanup"] for f, k in kinds.items() if k.get("by_cleanup")}
        if cleaned:
            lines += ["", "Left by the job's teardown and removed by `pcocc internal setup cleanup` (per fault kind, objects):", ""]
            lines += [f"- {f}: " + ", ".join(f"{w} {n}" for w, n in sorted(c.items())) for f, c in sorted(cleaned.items())]
        if b.get("cleaned"):
            lines += ["", "Cycles whose teardown left something for `setup cleanup`:", ""]
            lines += [f"- cycle {l['cycle']} {l['fault']} ({l.get('variant')}) job {l['jobid']}: {json.dumps(l['left'])}"
                      for l in b["cleaned"][:40]]
        if b["leaks"]:
            lines += ["", "Leftovers:", ""]
            lines += [f"- cycle {l['cycle']} {l['fault']} ({l.get('variant')}) job {l['jobid']}: {json.dumps(l['left'])}"
                      for l in b["leaks"][:40]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--backend", choices=["local", "slurm", "both"], default="both")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", help="comma-separated fault kinds to draw from (default: all that apply)")
    p.add_argument("--each", action="store_true", help="draw no fault kind: take each in turn (for tests)")
    p.add_argument("--nodes", type=int, default=2, help="SLURM test cluster nodes")
    p.add_argument("--out", default=str(RESULTS), help="directory of faults.md and faults.json")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/faults.py runs as root (network namespaces, Open vSwitch, the SLURM test cluster)")
    # main() also runs inside a test process: its handlers are given back as they were
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(args)
    finally:
        for s, h in handlers.items():
            if h is not None:  # None: set outside Python, which cannot be put back from here
                signal.signal(s, h)


def _main(args):
    # A shell without job control starts background commands with SIGINT ignored, and children
    # inherit that: the Ctrl-C fault would then test nothing. Ours is Python's, so theirs is the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = 0
    for backend in (["local", "slurm"] if args.backend == "both" else [args.backend]):
        tally, started = Tally(), time.monotonic()
        meta = {"cycles": args.cycles, "seed": args.seed, "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start"}
        faults = args.faults.split(",") if args.faults else None
        workdir = tempfile.mkdtemp(prefix=f"pcocc-faults-{backend}-")
        bench = None
        try:
            if backend == "local":
                bench = LocalBench(workdir)
            else:
                bench = SlurmBench(workdir, nodes=args.nodes)
            for f in faults or []:
                if f not in bench.faults:
                    sys.exit(f"fault {f!r} does not apply to the {backend} backend: {', '.join(bench.faults)}")
            def progress():  # results after every cycle: a run stopped at any point keeps its figures
                meta.update(cycles_run=sum(k["cycles"] for k in tally.kinds.values()), duration_s=time.monotonic() - started)
                if hasattr(bench, "notes"):
                    meta["notes"] = bench.notes()
                write_results(args.out, backend, tally, meta)

            signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID: stop, clean, write
            try:
                run(bench, args.cycles, args.seed, tally, faults, each=args.each, progress=progress)
            except KeyboardInterrupt:
                meta["notes"] = "Interrupted."
                status = 130
        finally:
            if bench is not None:
                bench.close()
            shutil.rmtree(workdir, ignore_errors=True)
            meta["cycles_run"] = sum(k["cycles"] for k in tally.kinds.values())
            meta["duration_s"] = time.monotonic() - started
            if bench is not None and hasattr(bench, "notes"):
                meta["notes"] = (bench.notes() + (" Interrupted." if status == 130 else "")).strip()
            if meta["cycles_run"]:
                write_results(args.out, backend, tally, meta)
        left = sum(sum(k["leftovers"].values()) for k in tally.kinds.values())
        log(f"{backend}: {meta['cycles_run']} cycles, {left} leftovers, {len(tally.failures)} failed checks or errors")
        if left or tally.failures:
            status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
