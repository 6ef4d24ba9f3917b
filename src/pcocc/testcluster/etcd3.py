"""A 3-member etcd cluster for fault tests and scale work: start it, kill one member, restart it.

    with Etcd3(base) as cluster:                  # three members on 127.0.0.1, ports picked free
        settings = cluster.batch_settings()       # batch.yaml settings for pcocc's etcd store
        cluster.kill(1)                           # SIGKILL member 1: the other two keep a quorum
        cluster.restart(1)                        # same data dir: it rejoins and catches up

Members listen on loopback by default. Processes in other network namespaces (the
test cluster's SLURM nodes) cannot reach the host's loopback: give `hosts`, one
address each, that they reach (e.g. addresses on the test cluster's bridge;
`add_addresses` puts them there and `close` removes them). With distinct
addresses the members share one client port, as batch.yaml's `etcd-servers` +
`etcd-client-port` describe a production cluster (one port, several hosts).

Timing, for a loaded 2-core host (a CPU hog on both cores, qemu under TCG beside):
- `--heartbeat-interval=100` ms and `--election-timeout=2500` ms. etcd's defaults
  (100/1000) assume a member answers within ~1 s; on a host whose run queue holds
  a dozen busy threads a member can be descheduled for several hundred ms, and a
  1 s timeout then starts needless elections (each stalls writes). 2.5 s keeps
  the cluster stable under load, and a killed leader is still replaced within
  about 3 s. The single-member harness (`etcd.py`) uses 10/100 because a lone
  member never holds an election.
- `--snapshot-count=10000` (default 100000): less memory in the raft log of a
  short-lived test cluster; `--quota-backend-bytes` 256 MiB and `--auto-compaction`
  keep a long bench from filling the backend.
- `--max-request-bytes` is left at etcd's default (1.5 MiB): pcocc must fit in it.
- waits for health are bounded polls (`HEALTH_TIMEOUT`, default 60 s: 3 members
  start in 1-3 s idle, up to ~20 s measured with both cores busy).

Every process started here is recorded with its pid and stopped by it in `close`.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from pcocc.errors import TimeoutExpired

HEARTBEAT_MS = 100
ELECTION_MS = 2500
HEALTH_TIMEOUT = 60.0
MEMBERS = 3

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host="127.0.0.1", avoid=()):
    """A TCP port free on host now (the kernel's pick; not in `avoid`)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


class Member:
    def __init__(self, name, host, client_port, peer_port, data_dir):
        self.name, self.host = name, host
        self.client_port, self.peer_port = client_port, peer_port
        self.data_dir = Path(data_dir)
        self.proc = None

    @property
    def client_url(self):
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def healthy(self):
        try:
            with _NO_PROXY.open(f"{self.client_url}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False


class Etcd3:
    """Three etcd members (v3 API) under base/etcd3/<name>; see the module docstring."""

    def __init__(self, base, hosts=None, client_port=None, token=None, log=None):
        self.base = Path(base) / "etcd3"
        hosts = list(hosts or ["127.0.0.1"] * MEMBERS)
        if len(hosts) != MEMBERS:
            raise ValueError(f"{MEMBERS} hosts expected, got {hosts}")
        self.log = log or (lambda line: None)
        self.token = token or f"pcocc-etcd3-{os.getpid()}-{int(time.time())}"
        self._addresses = []  # (address/prefix, device) we added, removed by close()
        used = set()
        self.members = []
        for i, host in enumerate(hosts):
            cport = client_port or free_port(host, used)
            used.add(cport)
            pport = free_port(host, used)
            used.add(pport)
            self.members.append(Member(f"m{i}", host, cport, pport, self.base / f"m{i}"))
        self.distinct_hosts = len(set(hosts)) == MEMBERS

    # ------------------------------------------------------------ addresses
    @staticmethod
    def add_addresses(addresses, device, prefixlen):
        """Put addresses on device (e.g. the test cluster's bridge) for members to listen on;
        returns what to pass as `added` to remove them."""
        added = []
        for a in addresses:
            subprocess.run(["ip", "addr", "add", f"{a}/{prefixlen}", "dev", device], check=True, capture_output=True)
            added.append((f"{a}/{prefixlen}", device))
        return added

    def own_addresses(self, added):
        """Remove these (address/prefix, device) at close()."""
        self._addresses += added

    # ------------------------------------------------------------ life
    def start(self, timeout=HEALTH_TIMEOUT):
        self.base.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            self._spawn(m, "new")
        self.wait_healthy(timeout=timeout)
        self.log(f"etcd3: {MEMBERS} members healthy at {', '.join(self.endpoints)}")
        return self

    def _spawn(self, m, cluster_state):
        m.data_dir.parent.mkdir(parents=True, exist_ok=True)
        listen = m.client_url  # only there: members on several addresses may share one port
        argv = ["etcd", "--name", m.name, "--data-dir", str(m.data_dir),
                f"--heartbeat-interval={HEARTBEAT_MS}", f"--election-timeout={ELECTION_MS}",
                "--snapshot-count=10000", f"--quota-backend-bytes={256 << 20}",
                "--auto-compaction-mode=periodic", "--auto-compaction-retention=10m",
                "--log-level=warn", "--logger=zap",
                "--listen-client-urls", listen, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", ",".join(f"{o.name}={o.peer_url}" for o in self.members),
                "--initial-cluster-state", cluster_state, "--initial-cluster-token", self.token]
        logf = open(self.base / f"{m.name}.log", "ab")
        try:
            m.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        finally:
            logf.close()

    def wait_healthy(self, members=None, timeout=HEALTH_TIMEOUT):
        """Bounded poll until every given member (default: every running one) says healthy."""
        members = [self.members[i] for i in members] if members is not None else [m for m in self.members if m.pid]
        deadline = time.monotonic() + timeout
        while True:
            sick = [m for m in members if not m.healthy()]
            if not sick:
                return
            dead = [m for m in sick if m.proc is None or m.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                which = dead or sick
                raise TimeoutExpired(f"etcd3: member(s) {', '.join(m.name for m in which)} "
                                     f"{'exited' if dead else f'not healthy after {timeout} s'}: {self.tail(which[0])}")
            time.sleep(0.1)

    def kill(self, i, sig=signal.SIGKILL, timeout=30):
        """Kill member i (by its pid) and wait until it is gone."""
        m = self.members[i]
        if m.proc is None or m.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            m.proc.send_signal(sig)
        try:
            m.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()
        self.log(f"etcd3: {m.name} killed ({signal.Signals(sig).name})")

    def restart(self, i, timeout=HEALTH_TIMEOUT):
        """Start member i again on its data dir (it rejoins the cluster) and wait until it is healthy."""
        m = self.members[i]
        if m.pid:
            raise RuntimeError(f"etcd3: {m.name} still runs (pid {m.pid})")
        self._spawn(m, "existing")
        self.wait_healthy([i], timeout=timeout)
        self.log(f"etcd3: {m.name} restarted")

    def close(self):
        """Stop every member by pid; remove the addresses we added. Idempotent."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
                try:
                    m.proc.wait(10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()
        for addr, dev in self._addresses:
            subprocess.run(["ip", "addr", "del", addr, "dev", dev], check=False, capture_output=True)
        self._addresses = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ use
    @property
    def endpoints(self):
        return [m.client_url for m in self.members]

    def batch_settings(self):
        """batch.yaml settings that point pcocc's store at the three members."""
        if self.distinct_hosts and len({m.client_port for m in self.members}) == 1:
            return {"etcd-servers": [m.host for m in self.members], "etcd-client-port": self.members[0].client_port,
                    "etcd-protocol": "http"}
        return {"etcd-servers": [f"{m.host}:{m.client_port}" for m in self.members], "etcd-protocol": "http"}

    def leader(self):
        """Index of the current leader, or None (from each running member's /v3/maintenance/status)."""
        for i, m in enumerate(self.members):
            if not m.pid:
                continue
            try:
                req = urllib.request.Request(f"{m.client_url}/v3/maintenance/status", data=b"{}", method="POST")
                with _NO_PROXY.open(req, timeout=2) as r:
                    st = json.loads(r.read())
                if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                    return i
            except (OSError, ValueError):
                continue
        return None

    def _post(self, member, path, body, timeout=60):
        req = urllib.request.Request(f"{member.client_url}/v3/{path}", data=json.dumps(body).encode(), method="POST")
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return json.loads(r.read())

    def status(self):
        """[{"member", "db_bytes", "revision"}] of each running member (/v3/maintenance/status:
        dbSize is the size of the member's backend file, free pages included)."""
        out = []
        for m in self.members:
            if m.pid:
                st = self._post(m, "maintenance/status", {})
                out.append({"member": m.name, "db_bytes": int(st.get("dbSize", 0)), "revision": int(st["header"]["revision"])})
        return out

    def compact_and_defrag(self):
        """Compact the history up to the current revision, then defragment every running
        member (what an administrator does, as root: etcd.io/docs/v3.4/op-guide/maintenance);
        returns status() after. Defragmenting blocks a member for its duration: not under load."""
        running = [m for m in self.members if m.pid]
        if not running:
            raise RuntimeError("etcd3: no member runs")
        revision = int(self._post(running[0], "maintenance/status", {})["header"]["revision"])
        try:
            self._post(running[0], "kv/compaction", {"revision": str(revision), "physical": True})
        except urllib.error.HTTPError as exc:  # already compacted to this revision
            if b"compacted" not in exc.read():
                raise
        for m in running:
            self._post(m, "maintenance/defragment", {})
        return self.status()

    def tail(self, m, lines=5):
        try:
            return " | ".join((self.base / f"{m.name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
