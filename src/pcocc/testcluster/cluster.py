"""TestCluster: bring the real multi-node stack up and down, and run commands on its nodes."""

import concurrent.futures
import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pcocc.errors import NotFoundError, PermissionDenied, UsageError
from pcocc.testcluster import etcd, munge, net, ovs, pcoccconf, pkgs, proc, slurm, spank, tun, users
from pcocc.testcluster.net import ClashError, Layout
from pcocc.testcluster.state import State

DEFAULT_BASE = "/tmp/pcocc-testcluster"


def default_pcocc():
    """The pcocc beside this interpreter (a venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "pcocc"
    return str(beside if beside.exists() else shutil.which("pcocc") or "/usr/bin/pcocc")


class TestCluster:
    """munge, etcd, slurmctld and N slurmd nodes in network namespaces, with OVS per node.

    Everything lives under `base` and is recorded in base/state.json before it
    is made, so down() removes exactly that, also after a failed up() or a crash.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, base=DEFAULT_BASE, nodes=2, ovs=True, pcocc=None, install=True, log=None):
        self.base = Path(base).resolve()
        saved = State.load(self.base)
        if saved.exists():  # an existing cluster's shape wins over the arguments
            nodes, ovs = saved.get("nodes", nodes), saved.get("ovs", ovs)
        self.layout = Layout(self.base, int(nodes))
        self.ovs = ovs
        self.pcocc = str(pcocc or default_pcocc())
        self.install = install
        self.log = log or (lambda message: None)
        self.timings = {}
        self._children = []  # Popen objects of the daemons we started, to reap them
        self._t0 = None

    # ---------------------------------------------------------------- facts

    @property
    def id(self):
        return self.layout.id

    @property
    def node_names(self):
        return self.layout.node_names

    @property
    def etcd_endpoint(self):
        return f"http://{self.layout.host_ip}:{self.layout.etcd_port}"

    @property
    def slurm_conf(self):
        return str(slurm.conf_path(self.base))

    @property
    def env(self):
        """What a client of the cluster needs in its environment."""
        return {
            "SLURM_CONF": self.slurm_conf,
            "ETCDCTL_API": "3",
            "ETCDCTL_ENDPOINTS": self.etcd_endpoint,
            "PCOCC_TESTCLUSTER": str(self.base),
            "PCOCC_SYSTEM_CONF_DIR": str(pcoccconf.conf_dir(self.base)),
            **pcoccconf.etcdctl_credentials(self.base),
        }

    def netns(self, node):
        return self.layout.netns(node)

    def node_ip(self, node):
        return self.layout.node_ip(node)

    def ovs_rundir(self, node):
        return str(ovs.rundir(self.base, node))

    def node_state_dir(self, node):
        return str(pcoccconf.node_state_dir(self.base, node))

    @property
    def pcocc_link(self):
        """The `pcocc` the SPANK plugin runs: a symlink, so tests can swap it without restarting slurmd."""
        return self.base / "bin" / "pcocc"

    # ---------------------------------------------------------------- up

    def up(self):
        """Install what is missing, start everything, wait until every node is idle; returns self.

        On failure, what was started stays recorded: call down() (the CLI does).
        """
        if os.geteuid() != 0:
            raise PermissionDenied("the test cluster needs root (namespaces, bridges, daemons)")
        if State(self.base).exists():
            raise ClashError(f"a test cluster is already recorded in {self.base}",
                             hint=f"run `pcocc-testcluster down --base {self.base}` first")
        self._t0 = time.monotonic()
        if self.install:
            pkgs.ensure(self.ovs, log=self.log)
            self._lap("packages")
        _check_reachable(self.base)
        net.check_clashes(self.layout, self.ovs)
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # the test user reaches the munge socket, slurm.conf and the plugin
        state = State(self.base)
        state.set(id=self.id, base=str(self.base), nodes=self.layout.nodes, ovs=self.ovs,
                  owner_pid=os.getpid(), ready=False)
        self._up(state)
        state.set(ready=True)
        self._lap("ready")
        return self

    def _up(self, state):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plugin = pool.submit(self._build_plugin)  # gcc takes ~0.5 s: overlap it with the daemons
            self._start(state, plugin)

    def _start(self, state, plugin):
        L, base = self.layout, self.base
        self.pcocc_link.parent.mkdir(exist_ok=True)
        self.use_pcocc(self.pcocc)
        munged = self._keep(munge.start(state, base))
        net.create(state, L, self.ovs)
        if self.ovs:
            tun.open_up(state, self.id)  # the users' qemu attach to their taps
        self._lap("network")
        etcd_proc = self._keep(etcd.start(state, base, L))
        switches = {}
        if self.ovs:
            dbs = {n: self._keep(ovs.start_db(state, base, L, n)) for n in L.node_names}
            switches = {n: self._keep(ovs.start_switch(state, base, L, n, dbs[n])) for n in L.node_names}
        pcoccconf.write(base, L)
        slurm.write_config(base, L, plugin.result(), self.pcocc_link)
        munge.wait(base, munged)
        self._lap("munge")
        ctld = self._keep(slurm.start_controller(state, base, L))
        # slurmd registers once at start: if slurmctld is not listening yet, the node waits for its next ping
        slurm.wait_controller(base, L, ctld)
        slurmds = {f"slurmd:{n}": self._keep(slurm.start_node(state, base, L, n, self.ovs)) for n in L.node_names}
        etcd.wait(base, L, etcd_proc)
        pcoccconf.enable_etcd_auth(base, L)
        self._lap("etcd")
        for n, switch in switches.items():
            ovs.wait(base, L, n, switch)
            ovs.add_tunnel_bridge(base, L, n)
        if switches:
            self._lap("ovs")
        slurm.wait_idle(base, L, {"slurmctld": ctld, **slurmds})
        self._lap("slurm")

    def _build_plugin(self):
        try:
            plugin = spank.build(self.base / "spank")
        except NotFoundError as e:  # an installed pcocc without its source: a cluster without --vm
            self.log(f"warning: SPANK plugin not built: {e.message}")
            return None
        self._lap("spank")
        return plugin

    def _keep(self, child):
        self._children.append(child)
        return child

    def _lap(self, what):
        elapsed = time.monotonic() - self._t0
        self.timings[what] = round(elapsed, 3)
        self.log(f"[{elapsed:6.2f}s] {what}")

    # ---------------------------------------------------------------- down

    def down(self):
        """Stop and delete everything recorded; idempotent. Returns False if nothing was recorded."""
        state = State.load(self.base)
        if not state.exists():
            self._reap()
            return False
        self._t0 = time.monotonic()
        recorded = {p["name"]: p for p in state["processes"]}
        if _pid(recorded.get("slurmctld"), self.base):
            slurm.cancel_all(self.base)  # lets the plugin's `setup delete` run
        leaders = {name: _pid(p, self.base) for name, p in recorded.items()}
        # children that outlive their daemon (slurmctld's slurmscriptd) share its session
        members = proc.session_members(leaders.values())
        proc.stop([pid for name, pid in leaders.items() if name.startswith("slurm")])
        if state["processes"]:
            self._cleanup_nodes()
        # slurmstepd, job tasks, VMs: whatever still lives in our namespaces
        proc.stop([pid for ns in state["netns"] for pid in net.netns_pids(ns)])
        proc.stop(list(leaders.values()) + members)
        self._lap("down: processes stopped")
        net.destroy(state)
        tun.restore(state, self.id)
        self._lap("down: network removed")
        for name in state["users"]:
            users.remove(name)
        self._reap()
        shutil.rmtree(self.base, ignore_errors=True)
        self._lap("down")
        return True

    def _cleanup_nodes(self):
        """What an admin does after a crash: `pcocc internal setup cleanup` on each node, which undoes
        every job setup its undo log names (job namespaces and their dnsmasq live outside the nodes')."""
        for node in self.node_names:
            argv = [*self.enter_argv(node), self.pcocc, "internal", "setup", "cleanup"]
            r = subprocess.run(argv, env={**os.environ, **self.env, **self.node_env(node)}, capture_output=True, text=True,
                               timeout=120)
            if r.returncode != 0:
                self.log(f"down: setup cleanup on {node}: {r.stderr.strip()}")

    def _reap(self):
        for child in self._children:
            if child.poll() is None:
                child.kill()
                child.wait()
        self._children = []

    def leftovers(self):
        """What of a recorded cluster still exists (empty after down())."""
        state = State.load(self.base)
        if not state.exists():
            return []
        alive = [f"process {p['name']} ({p['pid']})" for p in state["processes"] if _pid(p, self.base)]
        return alive + net.leftovers(state) + [f"user {u}" for u in state["users"] if users.exists(u)]

    # ---------------------------------------------------------------- use

    def add_user(self, name=None):
        """Create an unprivileged user (removed by down()); returns its pwd entry."""
        state = State.load(self.base)
        name = name or f"pcocc{self.id}"
        home = self.base / "home" / name
        home.parent.mkdir(mode=0o755, exist_ok=True)
        return users.add(state, name, home)

    def use_pcocc(self, path):
        """Point the plugin's `pcocc` at path (takes effect for the next step)."""
        tmp = self.pcocc_link.with_name(".pcocc.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        os.replace(tmp, self.pcocc_link)

    @contextlib.contextmanager
    def pcocc_replaced(self, path):
        """Run the plugin's steps with another `pcocc` (e.g. a fake) inside the block."""
        previous = os.readlink(self.pcocc_link)
        self.use_pcocc(path)
        try:
            yield
        finally:
            self.use_pcocc(previous)

    def run(self, argv, *, user=None, env=None, check=False, timeout=120, input=None, cwd=None):
        """Run argv on the host with the cluster's environment, as root or as user."""
        return self._run([], argv, user, env, check, timeout, input, cwd)

    def onnode(self, node, argv, *, user=None, env=None, check=False, timeout=120, input=None, cwd=None):
        """Run argv in node's network and UTS namespaces (with slurmd's node variables: OVS_RUNDIR...), as root or as user."""
        extra = {**self.node_env(node), **(env or {})}
        return self._run(self.enter_argv(node), argv, user, extra, check, timeout, input, cwd)

    def enter_argv(self, node):
        """The command prefix that enters node's network and UTS namespaces (for a Popen of one's own)."""
        if node not in self.node_names:
            raise NotFoundError(f"no node {node} in this test cluster (nodes: {', '.join(self.node_names)})")
        enter = ["nsenter", f"--net=/run/netns/{self.netns(node)}"]
        slurmd = _pid(_entry(State.load(self.base), f"slurmd:{node}"), self.base)
        if slurmd:  # the node's hostname lives in slurmd's UTS namespace
            enter.append(f"--uts=/proc/{slurmd}/ns/uts")
        return [*enter, "--"]

    def node_env(self, node):
        """The variables slurmd (so node setup) has on node: OVS_RUNDIR, PCOCC_NODE_STATE_DIR..."""
        return slurm.node_env(self.base, self.layout, node, self.ovs)

    def _run(self, prefix, argv, user, env, check, timeout, input, cwd):
        if user:  # runuser comes after nsenter: entering namespaces needs root
            prefix = [*prefix, "runuser", "-u", user, "--"]
            cwd = cwd or pwd.getpwnam(user).pw_dir
        return subprocess.run([*prefix, *map(str, argv)], env={**os.environ, **self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd, check=check)

    def status(self):
        state = State.load(self.base)
        if not state.exists():
            return {"base": str(self.base), "id": self.id, "up": False}
        return {
            "base": str(self.base),
            "id": self.id,
            "up": bool(state.get("ready")),
            "nodes": slurm.node_states(self.base, timeout=3) if _pid(_entry(state, "slurmctld"), self.base) else {},
            "processes": {p["name"]: {"pid": p["pid"], "alive": bool(_pid(p, self.base))} for p in state["processes"]},
            "netns": state["netns"],
            "links": state["links"],
            "users": state["users"],
            "env": self.env,
        }

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()


def _check_reachable(base):
    """The test user must reach the munge socket and slurm.conf under base."""
    for parent in base.parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise UsageError(f"{parent} is not searchable by other users (mode {parent.stat().st_mode & 0o777:o}), "
                             f"so jobs could not reach {base}", hint="choose a --base under /tmp")


def _entry(state, name):
    return next((p for p in state["processes"] if p["name"] == name), None)


def _pid(entry, base):
    """The live pid of a recorded process, or None; never a reused pid that is not ours."""
    if not entry:
        return None
    pid = entry.get("pid")
    if pid:
        if proc.alive(pid) and proc.process_start_time(pid) == entry.get("start"):
            return pid
        return None
    # crashed between start and record: trust the pidfile only if the process names our base dir
    pid = proc.read_pidfile(entry["pidfile"]) if entry.get("pidfile") else None
    if pid and proc.alive(pid):
        try:
            if str(base).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        except OSError:
            pass
    return None
