"""Simulated hosts: the real node setup and VM start of a virtual cluster, many hosts at once.

    with Etcd3(base) as etcd:                                   # or any etcd: endpoints
        result = simulate(etcd.endpoints, base, hosts=100)      # one job of 100 hosts x 16 VMs
        assert not result["problems"]

Each simulated host runs pcocc's own code with its identity injected (its Context's
`hostname`, its node state directory through PCOCC_NODE_STATE_DIR, its etcd connection):
- node setup: `nodesetup.create` (the cluster's record, the plan, the VXLAN id, external
  addresses and reverse-NAT ports allocated in the store, the node's tunnel endpoint
  published and the peers' awaited, every host object recorded in the undo log before it
  is made, the node's state) and at the end `nodesetup.delete` (the undo log replayed,
  the ids given back);
- the launcher's part: the cluster's record (`SlurmBackend.cluster_info`, the job's
  credentials), its wait for every VM (`launcher.wait_started`) and its end (`launcher._record_end`:
  the history record), real code;
- the VM processes' part: what `vmrun.run_vm` does with the store, reproduced (its
  `publish` is a closure inside run_vm, not callable alone): read the cluster's record
  and CA, then one record per phase (starting, qemu-start, booting, running) and the
  end (stopped, written by compare-and-swap into the record if it still exists).

What reaches the kernel, qemu or SLURM is answered by a `RecordingFake` per host (named
as the fake it is): every command pcocc runs through `pcocc.runner.run` (ip, ovs-vsctl,
iptables, sysctl, ethtool, dnsmasq, nsenter, squeue, scontrol) is recorded and answered
as the real tool would, on an in-memory model of the host (namespaces, links, addresses,
routes, OVS bridges and ports, iptables chains and rules, daemons), with the real tools'
errors for what does not exist or exists already. Also faked: the kernel's Open vSwitch
datapath probe (a production kernel: it has one) and the signal that stops a daemon.
No qemu, qemu-img or seed image is made: the VM processes' store writes are reproduced
without them. Files (dnsmasq's configuration, the undo log) are real, in the host's
state directory.

Checks (`check_setup`, `check_teardown`): the host's objects are exactly the ones its
undo log lists (each entry maps to one object of the fake, and the fake holds no other),
every object was recorded before it was made (optional: O(log) per command), and after
the teardown the fake is back to its initial state and the state directory is empty.
The caller checks the cluster-wide ids (no duplicate) and the pools (empty at the end).

Hosts run as threads (one per host: a host's setup waits for every other host's
tunnel endpoint), spread over a few forked worker processes so that both cores work;
each host has its own etcd connection.
"""

import json
import multiprocessing
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

VMS_PER_HOST = 16
FAKE_PID = 4194305  # above any pid_max (at most 2**22): no process has this pid
USER_CONF = "user"

NETWORKS_YAML = """\
pub:
  type: ethernet
  settings:
    dev-prefix: pl
    network-layer: L3
    mac-prefix: '52:54'
    int-network: 10.0.0.0/8
    ext-network: 100.64.0.0/10
    domain-name: sim.test
    reverse-nat:
      vm-port: 22
      min-host-port: 40000
      max-host-port: 40099
"""


def write_config(base, endpoints):
    """The pcocc configuration of the simulation under base/etc: SLURM backend, the etcd at
    endpoints, one L3 ethernet network with reverse NAT, a template `sim` on it."""
    from urllib.parse import urlsplit

    etc = Path(base) / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    urls = [urlsplit(e) for e in endpoints]
    (etc / "batch.yaml").write_text(
        "type: slurm\nsettings:\n"
        f"  etcd-servers: [{', '.join(repr(u.hostname) for u in urls)}]\n"
        f"  etcd-client-port: {urls[0].port}\n  etcd-protocol: http\n  etcd-auth-type: none\n")
    (etc / "networks.yaml").write_text(NETWORKS_YAML)
    (etc / "resources.yaml").write_text("default:\n  default: true\n  networks: []\nl3net:\n  networks: [pub]\n")
    (etc / "templates.yaml").write_text("sim:\n  image: /nonexistent/sim.qcow2\n  resource-set: l3net\n")
    (Path(base) / USER_CONF).mkdir(exist_ok=True)
    return etc


# --------------------------------------------------------------------------- the fake
class FakeSlurm:
    """The batch system's answers (squeue, scontrol) for the simulation: the jobs that run,
    the nodes and their addresses."""

    def __init__(self, running=(), addresses=None, ended=None):
        self.running = set(map(int, running))
        self.addresses = dict(addresses or {})
        self.ended = ended  # an Event: once set, the jobs have ended (their launcher failed)

    def alive(self, job):
        return job in self.running and not (self.ended is not None and self.ended.is_set())

    def answer(self, argv):
        """(status, stdout, stderr) as squeue/scontrol would answer, or None: not theirs."""
        if argv[0] == "squeue":
            if "-j" in argv:
                job = int(argv[argv.index("-j") + 1])
                if self.alive(job):
                    return 0, "RUNNING\n", ""
                return 1, "", "slurm_load_jobs error: Invalid job id specified\n"
            return 0, "".join(f"{j} RUNNING\n" for j in sorted(self.running) if self.alive(j)), ""
        if argv[:3] == ["scontrol", "show", "node"]:
            host = argv[3]
            if host not in self.addresses:
                return 1, "", f"Node {host} not found\n"
            return 0, f"NodeName={host} Arch=x86_64 NodeAddr={self.addresses[host]} NodeHostName={host} State=ALLOCATED\n", ""
        if argv[:3] == ["scontrol", "show", "hostnames"]:
            return 0, "".join(f"{h}\n" for h in argv[3].split(",")), ""
        return None


class _Namespace:
    def __init__(self, name):
        self.name = name
        self.links = {"lo": {"kind": "loopback", "up": False, "addrs": [], "peer": None}}
        self.routes = {}  # dest -> (dev, via)
        self.chains = {("filter", c): [] for c in ("INPUT", "FORWARD", "OUTPUT")}
        self.chains.update({("nat", c): [] for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")})
        self.builtin = set(self.chains)
        self.sysctl = {}

    def empty_state(self):
        """What differs from a fresh namespace (sysctl settings aside: ip_forward stays on, by design)."""
        out = [("link", n) for n in self.links if n != "lo"]
        out += [("route", d) for d in self.routes]
        out += [("iptables-chain", t, c) for (t, c) in self.chains if (t, c) not in self.builtin]
        out += [("iptables", t, c, tuple(r)) for (t, c), rules in self.chains.items() for r in rules]
        return out


class FakeFailure(Exception):
    def __init__(self, status, stderr):
        super().__init__(stderr)
        self.status, self.stderr = status, stderr


class RecordingFake:
    """The kernel and host tools of one simulated host, in memory, with every command recorded.

    A FAKE, for the scale harness and tests: it answers `ip`, `ovs-vsctl`, `iptables`,
    `sysctl`, `ethtool`, `dnsmasq` and `nsenter` as the real tools do on a host (the same
    errors for a device that exists or does not, a chain not empty...) and keeps what they
    would have made; SLURM's commands are answered by the shared FakeSlurm.
    check_order: each creation asserts that the host's undo log already names the object
    (what DESIGN.md asks of node setup: recorded before it is made).
    """

    def __init__(self, host, slurm, state_dir, check_order=False):
        self.host, self.slurm, self.state_dir, self.check_order = host, slurm, str(state_dir), check_order
        self.commands = []  # every argv run, in order
        self.ns = {None: _Namespace(None)}  # None: the host's own namespace
        self.bridges = {}  # name -> {"datapath": ..., "ports": {port: {...}}}
        self.processes = {}  # pidfile -> argv
        self.order_errors = []

    # -- the runner's interface
    def run(self, argv, *, check=True, input=None, timeout=None, env=None, cwd=None, capture=True):
        from pcocc.errors import CommandError

        argv = [str(a) for a in argv]
        self.commands.append(argv)
        answer = self.slurm.answer(argv)
        if answer is None:
            try:
                out = self._exec(argv, None) or ""
                answer = (0, out, "")
            except FakeFailure as exc:
                answer = (exc.status, "", exc.stderr)
        status, out, err = answer
        if check and status != 0:
            raise CommandError(argv, status, err)
        return subprocess.CompletedProcess(argv, status, out, err)

    def stop_pidfile_process(self, pidfile, name):
        """hostnet.stop_pidfile_process: SIGTERM the daemon of pidfile if it is `name`; remove the file."""
        self.commands.append(["kill", "-TERM", f"(pidfile {pidfile})"])
        argv = self.processes.get(pidfile)
        if argv and os.path.basename(argv[0]) == name:
            del self.processes[pidfile]
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass

    @staticmethod
    def kernel_has_ovs_datapath():
        return True  # a production kernel (openvswitch module)

    # -- what the checks read
    def objects(self):
        """The host's objects as the undo log names them: {(kind, ...)} (see expected_objects)."""
        out = set()
        for b, br in self.bridges.items():
            out.add(("ovs-bridge", b))
            out.update(("ovs-port", b, p) for p in br["ports"])
        host = self.ns[None]
        out.update(("link", n) for n in host.links if n != "lo")
        out.update(("netns", n) for n in self.ns if n is not None)
        out.update(("iptables-chain", t, c) for (t, c) in host.chains if (t, c) not in host.builtin)
        for (t, c), rules in host.chains.items():
            for r in rules:
                if not (len(r) == 2 and r[0] == "-j" and (t, r[1]) in host.chains and (t, r[1]) not in host.builtin):
                    out.add(("iptables", t, c, tuple(r)))  # a jump to our chain goes with the chain
        out.update(("process", p) for p in self.processes)  # its pid file is part of it
        out.update(("file", str(p)) for p in Path(self.state_dir).iterdir()
                   if p.is_file() and not (p.name.startswith("undo-") or p.name == "setup.lock" or str(p) in self.processes))
        return out

    def leftovers(self):
        """Everything that differs from the host before the job (sysctl settings aside)."""
        out = sorted(map(str, self.objects()))
        out += [f"{ns}: {x}" for ns, n in self.ns.items() if ns is None for x in n.empty_state()]
        return sorted(set(out))

    # -- the tools
    def _exec(self, argv, ns):
        tool = os.path.basename(argv[0])
        if tool == "nsenter":
            target = argv[1]
            assert target.startswith("--net=/run/netns/"), argv
            name = target[len("--net=/run/netns/"):]
            if name not in self.ns:
                raise FakeFailure(1, f"nsenter: cannot open /run/netns/{name}: No such file or directory\n")
            return self._exec(argv[2:], name)
        handler = getattr(self, "_" + tool.replace("-", "_"), None)
        if handler is None:
            raise FakeFailure(127, f"{tool}: not simulated by RecordingFake ({shlex.join(argv)})\n")
        return handler(argv[1:], ns)

    def _recorded(self, kind, **args):
        """check_order: the undo log names this object already."""
        if not self.check_order:
            return
        from pcocc.networks.undo import UndoLog

        log = UndoLog(str(self.state_dir))
        for job in log.jobs():
            for e in log.entries(job):
                if e["kind"] == kind and all(e["args"].get(k) == v for k, v in args.items()):
                    return
        self.order_errors.append(f"{kind} {args} made before the undo log named it")

    def _link(self, ns, name):
        links = self.ns[ns].links
        if name not in links:
            raise FakeFailure(1, f'Cannot find device "{name}"\n')
        return links[name]

    def _del_link(self, ns, name):
        link = self.ns[ns].links.pop(name)
        self.ns[ns].routes = {d: r for d, r in self.ns[ns].routes.items() if r[0] != name}
        # (an OVS port whose device went stays in OVS's database, as the real one does)
        if link.get("peer"):
            pns, pname = link["peer"]
            if pns in self.ns and pname in self.ns[pns].links:
                self.ns[pns].links[pname]["peer"] = None
                self._del_link(pns, pname)

    def _ip(self, args, ns):
        if args[:1] == ["-n"]:
            if args[1] not in self.ns:
                raise FakeFailure(1, f'Cannot open network namespace "{args[1]}": No such file or directory\n')
            return self._ip(args[2:], args[1])
        obj, verb, rest = args[0], args[1] if len(args) > 1 else "", args[2:]
        links = self.ns[ns].links
        if obj == "tuntap" and verb == "add":
            name = rest[rest.index("dev") + 1]
            self._recorded("tap", name=name)
            if name in links:
                raise FakeFailure(1, "ioctl(TUNSETIFF): Device or resource busy\n")
            links[name] = {"kind": "tap", "up": False, "addrs": [], "peer": None, "user": rest[rest.index("user") + 1]}
            return ""
        if obj == "link" and verb == "set":
            link = self._link(ns, rest[rest.index("dev") + 1])
            if "mtu" in rest:
                link["mtu"] = int(rest[rest.index("mtu") + 1])
            if "up" in rest:
                link["up"] = True
            if "master" in rest:
                link["master"] = rest[rest.index("master") + 1]
            return ""
        if obj == "link" and verb == "add":
            name, peer = rest[0], rest[rest.index("peer") + 2]
            target = rest[rest.index("netns") + 1] if "netns" in rest else ns
            self._recorded("link", name=name)
            if target not in self.ns:
                raise FakeFailure(1, f'Invalid "netns" value "{target}"\n')
            if name in links or peer in self.ns[target].links:
                raise FakeFailure(2, "RTNETLINK answers: File exists\n")
            links[name] = {"kind": "veth", "up": False, "addrs": [], "peer": (target, peer)}
            self.ns[target].links[peer] = {"kind": "veth", "up": False, "addrs": [], "peer": (ns, name)}
            return ""
        if obj == "link" and verb == "del":
            self._link(ns, rest[rest.index("dev") + 1])
            self._del_link(ns, rest[rest.index("dev") + 1])
            return ""
        if obj == "link" and verb == "show":
            link = self._link(ns, rest[rest.index("dev") + 1])
            return f"1: {rest[-1]}: <{'UP' if link['up'] else ''}> mtu {link.get('mtu', 1500)}\n"
        if obj == "netns":
            if verb == "list":
                return "".join(f"{n} (id: {i})\n" for i, n in enumerate(n for n in self.ns if n is not None))
            name = rest[0]
            if verb == "add":
                self._recorded("netns", name=name)
                if name in self.ns:
                    raise FakeFailure(1, f'Cannot create namespace file "/run/netns/{name}": File exists\n')
                self.ns[name] = _Namespace(name)
                return ""
            if verb == "del":
                if name not in self.ns:
                    raise FakeFailure(1, f'Cannot remove namespace file "/run/netns/{name}": No such file or directory\n')
                for link in list(self.ns[name].links):  # its devices go with it, veth peers included
                    if link in self.ns[name].links:
                        self._del_link(name, link)
                del self.ns[name]
                return ""
        if obj == "addr" and verb == "add":
            cidr, dev = rest[0], rest[rest.index("dev") + 1]
            link = self._link(ns, dev)
            if cidr in link["addrs"]:
                raise FakeFailure(2, "RTNETLINK answers: File exists\n")
            link["addrs"].append(cidr)
            return ""
        if obj == "route" and verb == "replace":
            dest, dev = rest[0], rest[rest.index("dev") + 1]
            self._link(ns, dev)
            via = rest[rest.index("via") + 1] if "via" in rest else None
            self.ns[ns].routes[dest] = (dev, via)
            return ""
        raise FakeFailure(1, f"ip: not simulated by RecordingFake: ip {shlex.join(args)}\n")

    def _ovs_vsctl(self, args, ns):
        assert ns is None, "ovs-vsctl runs in the host's namespace"
        args = [a for a in args if not a.startswith("--timeout=")]
        if_exists = "--if-exists" in args
        args = [a for a in args if a != "--if-exists"]
        commands, cur = [], []
        for a in args:
            if a == "--":
                commands.append(cur)
                cur = []
            else:
                cur.append(a)
        commands.append(cur)
        first, rest = commands[0], commands[1:]
        verb = first[0]
        if sum(c[:1] == ["add-port"] for c in commands) > 1:  # several ports in one transaction: all or none
            groups = []
            for c in commands:
                if c[:1] == ["add-port"] or not groups:
                    groups.append([])
                groups[-1] += [*(["--"] if groups[-1] else []), *c]
            made = []
            try:
                for g in groups:
                    self._ovs_vsctl(g, ns)
                    made.append((g[1], g[2]))
            except FakeFailure:
                for bridge, port in made:
                    del self.bridges[bridge]["ports"][port]
                raise
            return ""
        if verb == "add-br":
            name = first[1]
            self._recorded("ovs-bridge", bridge=name)
            if name in self.bridges:
                raise FakeFailure(1, f"ovs-vsctl: cannot create a bridge named {name} because a bridge named {name} already exists\n")
            self.bridges[name] = {"datapath": None, "ports": {}}
            for c in rest:
                if c[:3] == ["set", "bridge", name]:
                    self.bridges[name].update(dict(kv.split("=", 1) for kv in c[3:]))
            return ""
        if verb == "add-port":
            bridge, port = first[1], first[2]
            self._recorded("ovs-port", bridge=bridge, port=port)
            if bridge not in self.bridges:
                raise FakeFailure(1, f"ovs-vsctl: no bridge named {bridge}\n")
            if any(port in b["ports"] for b in self.bridges.values()):
                raise FakeFailure(1, f"ovs-vsctl: cannot create a port named {port} because a port named {port} already exists on bridge {bridge}\n")
            attrs = {}
            for c in rest:
                attrs.update(dict(kv.split("=", 1) for kv in c[3:]))
            if attrs.get("type") != "vxlan" and port not in self.ns[None].links:
                raise FakeFailure(1, f"ovs-vsctl: Error detected while setting up '{port}': could not open network device {port} "
                                     "(No such device)\n")
            self.bridges[bridge]["ports"][port] = attrs
            return ""
        if verb == "del-br":
            name = first[1]
            if name not in self.bridges:
                if if_exists:
                    return ""
                raise FakeFailure(1, f"ovs-vsctl: no bridge named {name}\n")
            del self.bridges[name]
            return ""
        if verb == "del-port":
            bridge, port = first[1], first[2]
            if bridge not in self.bridges:
                raise FakeFailure(1, f"ovs-vsctl: no bridge named {bridge}\n")
            if port not in self.bridges[bridge]["ports"]:
                if if_exists:
                    return ""
                raise FakeFailure(1, f"ovs-vsctl: no port named {port}\n")
            del self.bridges[bridge]["ports"][port]
            return ""
        if verb == "br-exists":
            if first[1] not in self.bridges:
                raise FakeFailure(2, "")
            return ""
        if verb == "list-br":
            return "".join(f"{b}\n" for b in sorted(self.bridges))
        if verb == "list-ports":
            if first[1] not in self.bridges:
                raise FakeFailure(1, f"ovs-vsctl: no bridge named {first[1]}\n")
            return "".join(f"{p}\n" for p in sorted(self.bridges[first[1]]["ports"]))
        raise FakeFailure(1, f"ovs-vsctl: not simulated by RecordingFake: {shlex.join(args)}\n")

    def _iptables(self, args, ns):
        if args[:1] == ["-w"]:
            args = args[2:]
        table = "filter"
        if args[:1] == ["-t"]:
            table, args = args[1], args[2:]
        n = self.ns[ns]
        op = args[0]
        bad = "iptables: Bad rule (does a matching rule exist in that chain?).\n"
        missing = "iptables: No chain/target/match by that name.\n"
        if op in ("-A", "-I", "-C", "-D"):
            chain, rest = args[1], args[2:]
            if op == "-I" and rest[:1] and rest[0].isdigit():
                pos, rule = int(rest[0]) - 1, rest[1:]
            else:
                pos, rule = 0, rest
            if (table, chain) not in n.chains:
                raise FakeFailure(1, missing if op != "-C" else bad)
            if "-j" in rule and rule[rule.index("-j") + 1].startswith("PCOCC") and (table, rule[rule.index("-j") + 1]) not in n.chains:
                raise FakeFailure(2, "iptables v1.8.9 (nf_tables): Chain '%s' does not exist\n" % rule[rule.index("-j") + 1])
            rules = n.chains[(table, chain)]
            if op == "-C":
                if rule not in rules:
                    raise FakeFailure(1, bad)
                return ""
            if op == "-D":
                if rule not in rules:
                    raise FakeFailure(1, bad)
                rules.remove(rule)
                return ""
            if ns is None and not (len(rule) == 2 and rule[0] == "-j"):
                self._recorded("iptables", table=table, chain=chain, rule=rule)
            if op == "-A":
                rules.append(rule)
            else:
                rules.insert(pos, rule)
            return ""
        if op == "-N":
            if (table, args[1]) in n.chains:
                raise FakeFailure(1, "iptables: Chain already exists.\n")
            if ns is None:
                self._recorded("iptables-chain", table=table, chain=args[1])
            n.chains[(table, args[1])] = []
            return ""
        if op == "-X":
            chain = args[1]
            if (table, chain) not in n.chains:
                raise FakeFailure(1, missing)
            if n.chains[(table, chain)]:
                raise FakeFailure(1, "iptables: Directory not empty.\n")
            if any(r[-1] == chain and "-j" in r for rules in n.chains.values() for r in rules):
                raise FakeFailure(1, "iptables: Too many links.\n")
            del n.chains[(table, chain)]
            return ""
        if op == "-n" and args[1] == "-L" or op == "-L":
            chain = args[-1]
            if (table, chain) not in n.chains:
                raise FakeFailure(1, missing)
            return f"Chain {chain}\n" + "".join(" ".join(r) + "\n" for r in n.chains[(table, chain)])
        if op == "-S":
            chain = args[1]
            if (table, chain) not in n.chains:
                raise FakeFailure(1, missing)
            head = f"-P {chain} ACCEPT\n" if (table, chain) in n.builtin else f"-N {chain}\n"
            return head + "".join(f"-A {chain} {shlex.join(r)}\n" for r in n.chains[(table, chain)])
        raise FakeFailure(2, f"iptables: not simulated by RecordingFake: {shlex.join(args)}\n")

    def _sysctl(self, args, ns):
        name, value = args[-1].split("=", 1)
        self.ns[ns].sysctl[name] = value
        return ""

    def _ethtool(self, args, ns):
        self._link(ns, args[1])
        return ""

    def _dnsmasq(self, args, ns):
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        conf = opts["conf-file"]
        if not os.path.exists(conf):
            raise FakeFailure(1, f"\ndnsmasq: cannot read {conf}: No such file or directory\n")
        with open(conf) as f:
            leases = next((line.split("=", 1)[1].strip() for line in f if line.startswith("dhcp-leasefile=")), None)
        pidfile = opts["pid-file"]
        self._recorded("process", pidfile=pidfile)
        if "gw" not in self.ns[ns].links:
            raise FakeFailure(2, "\ndnsmasq: unknown interface gw\n")
        self.processes[pidfile] = ["dnsmasq", *args]
        # what the daemon makes: its pid file, its lease file, its log
        for path, text in ((pidfile, f"{FAKE_PID}\n"), (leases, ""), (opts.get("log-facility"), "dnsmasq: started (fake)\n")):
            if path:
                with open(path, "w") as f:
                    f.write(text)
        return ""


def expected_objects(entries):
    """The objects an undo log's entries name, as RecordingFake.objects() lists them
    (the store's ids, pool and pool-own entries, are checked in the store)."""
    out = set()
    for e in entries:
        k, a = e["kind"], e["args"]
        if k == "ovs-bridge":
            out.add(("ovs-bridge", a["bridge"]))
        elif k == "ovs-port":
            out.add(("ovs-port", a["bridge"], a["port"]))
        elif k in ("tap", "link"):
            out.add(("link", a["name"]))
        elif k == "netns":
            out.add(("netns", a["name"]))
        elif k == "iptables":
            out.add(("iptables", a["table"], a["chain"], tuple(a["rule"])))
        elif k == "iptables-chain":
            out.add(("iptables-chain", a["table"], a["chain"]))
        elif k == "process":
            out.add(("process", a["pidfile"]))
        elif k == "file":
            out.add(("file", a["path"]))
        elif k not in ("pool", "pool-own"):
            out.add(("unknown", k, json.dumps(a, sort_keys=True)))
    return out


# --------------------------------------------------------------------------- the runner, per thread
class FakeRunners:
    """Routes pcocc's calls to the kernel, qemu and SLURM to the RecordingFake of the host the
    calling thread simulates (set by `acting_as`): `run` in every pcocc module that imported
    pcocc.runner.run, hostnet's datapath probe and daemon stop. Installed once per process."""

    def __init__(self):
        self.local = threading.local()
        self.saved = []

    def current(self):
        fake = getattr(self.local, "fake", None)
        if fake is None:
            raise RuntimeError("a pcocc command ran outside a simulated host (simhosts.FakeRunners)")
        return fake

    def install(self):
        import sys

        from pcocc import runner
        from pcocc.lifecycle import launcher, nodesetup  # noqa: F401 - loaded before patching
        from pcocc.networks import ethernet, gateway, hostnet, jobnet  # noqa: F401
        from pcocc.batch import slurm  # noqa: F401

        real = runner.run
        dispatch = lambda argv, **kw: self.current().run(argv, **kw)  # noqa: E731
        for name, mod in list(sys.modules.items()):
            if name.startswith("pcocc") and getattr(mod, "run", None) is real:
                self.saved.append((mod, "run", real))
                mod.run = dispatch
        for attr, fn in (("kernel_has_ovs_datapath", lambda: self.current().kernel_has_ovs_datapath()),
                         ("stop_pidfile_process", lambda pidfile, name: self.current().stop_pidfile_process(pidfile, name))):
            self.saved.append((hostnet, attr, getattr(hostnet, attr)))
            setattr(hostnet, attr, fn)
        return self

    def uninstall(self):
        for mod, attr, value in reversed(self.saved):
            setattr(mod, attr, value)
        self.saved = []

    def acting_as(self, fake):
        self.local.fake = fake


# --------------------------------------------------------------------------- one simulated host
def host_name(i):
    return f"sim{i:04d}"


def host_addr(i):
    return f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"


class SimHost:
    """One simulated host: its identity (name, node state dir, address), its fake, its context."""

    def __init__(self, index, base, config, slurm, endpoints, check_order=False):
        from pcocc.context import Context
        from pcocc.env import Environment

        self.index, self.name = index, host_name(index)
        self.state_dir = Path(base) / "nodes" / self.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        environ = {"PCOCC_SYSTEM_CONF_DIR": str(Path(base) / "etc"), "PCOCC_USER_CONF_DIR": str(Path(base) / USER_CONF),
                   "PCOCC_NODE_STATE_DIR": str(self.state_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        self.ctx = Context(Environment(environ=environ, home=str(base)), config=config)
        self.ctx.hostname = self.name  # the host's identity
        self.fake = RecordingFake(self.name, slurm, self.state_dir, check_order=check_order)
        self.endpoints = endpoints
        self.ranks = list(range(index * VMS_PER_HOST, (index + 1) * VMS_PER_HOST))
        self.timings = {}

    def open_store(self):
        from pcocc.store.etcd import EtcdStore

        self.ctx._store = EtcdStore(self.endpoints)  # each host its own connection

    def close(self):
        self.ctx.close_store()

    def setup(self, jobid, uid, nodes):
        from pcocc.lifecycle import nodesetup

        t0, c0 = time.perf_counter(), time.thread_time()
        nodesetup.create(self.ctx, jobid, uid, len(self.ranks), ranks=self.ranks, step_nodes=nodes)
        self.timings["setup_s"] = time.perf_counter() - t0
        self.timings["setup_cpu_s"] = time.thread_time() - c0

    def start_vms(self, jobid, user):
        """The store's side of each local VM's start, as vmrun.run_vm does it (reproduced)."""
        from pcocc import state

        store = self.ctx.store
        t0, c0 = time.perf_counter(), time.thread_time()
        pid = 100000 + self.index
        for rank in self.ranks:
            info = store.wait(state.cluster_prefix(user, jobid) + "info", lambda items: bool(items), 120)
            if not info:
                raise RuntimeError(f"vm{rank}: no cluster record")
            store.get(state.cluster_prefix(user, jobid) + "ca")
            key = state.vm_key(user, jobid, rank)
            base = {"rank": rank, "name": f"vm{rank}", "host": self.name, "pid": pid + rank, "pid_start": 1}
            qemu = {"qemu_pid": FAKE_PID, "qemu_pid_start": 1}
            store.put(key, {**base, "state": "starting", "since": round(time.time(), 3)})
            store.put(key, {**base, "state": "qemu-start", "since": round(time.time(), 3), **qemu})
            store.put(key, {**base, "state": "booting", "since": round(time.time(), 3), **qemu})
            store.put(key, {**base, "state": "running", "since": round(time.time(), 3), **qemu, "agent": "ready",
                            "control": [host_addr(self.index), 50000 + rank % 10000], "rundir": f"/nonexistent/job_{jobid}/vm{rank}"})
        self.timings["vms_s"] = time.perf_counter() - t0
        self.timings["vms_cpu_s"] = time.thread_time() - c0

    def stop_vms(self, jobid, user):
        from pcocc import state

        for rank in self.ranks:  # vmrun's publish_end: only into a record that still exists
            self.ctx.store.update(state.vm_key(user, jobid, rank), lambda cur: cur and {**cur, "state": "stopped"})

    def teardown(self, jobid, uid):
        from pcocc.lifecycle import nodesetup

        t0 = time.perf_counter()
        nodesetup.delete(self.ctx, jobid, uid)
        self.timings["teardown_s"] = time.perf_counter() - t0

    def check_setup(self, jobid):
        """Problems (strings): the fake's objects against the undo log's, each way; order errors."""
        from pcocc.networks.undo import UndoLog

        entries = UndoLog(str(self.state_dir)).entries(jobid)
        want, have = expected_objects(entries), self.fake.objects()
        out = [f"{self.name}: in the undo log, not on the host: {o}" for o in sorted(map(str, want - have))[:5]]
        out += [f"{self.name}: on the host, not in the undo log: {o}" for o in sorted(map(str, have - want))[:5]]
        out += [f"{self.name}: {e}" for e in self.fake.order_errors[:5]]
        return out, len(want), [e for e in entries if e["kind"] in ("pool", "pool-own")]

    def check_teardown(self):
        out = [f"{self.name}: left on the host: {o}" for o in self.fake.leftovers()[:5]]
        files = sorted(p.name for p in self.state_dir.iterdir() if p.name != "setup.lock")
        if files:
            out.append(f"{self.name}: left in the node state dir: {', '.join(files[:5])}")
        return out


# --------------------------------------------------------------------------- a worker process
def stop_workers(children, out, timeout=60):
    """Let worker processes (multiprocessing) end, reading their queue `out` meanwhile (a child
    exits only once what it put there is read); SIGKILL by pid those still there after timeout s."""
    deadline = time.monotonic() + timeout
    while any(c.is_alive() for c in children) and time.monotonic() < deadline:
        try:
            out.get(timeout=0.2)
        except Exception:  # noqa: BLE001 - queue.Empty, or a half-written item of a killed child
            pass
    for c in children:
        if c.is_alive():
            os.kill(c.pid, signal.SIGKILL)
        c.join()


def count_requests():
    """Count every request this process sends to etcd (retries included): {"n": count}, updated
    as they go (EtcdClient._call_once wrapped). For the benches and the harness only."""
    from pcocc.store import etcd

    counter = {"n": 0}
    lock = threading.Lock()
    real = etcd.EtcdClient._call_once

    def counted(self, path, body, what):
        with lock:
            counter["n"] += 1
        return real(self, path, body, what)

    etcd.EtcdClient._call_once = counted
    return counter


def _worker(indexes, base, endpoints, nhosts, jobid, uid, user, check_order, go, ended, phase, out):
    """One process: a thread per simulated host of `indexes`; reports to `out`."""
    from pcocc.config.loader import load_config
    from pcocc.env import Environment

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    requests = count_requests()
    runners = FakeRunners().install()
    env = Environment(environ={"PCOCC_SYSTEM_CONF_DIR": str(Path(base) / "etc"), "PCOCC_USER_CONF_DIR": str(Path(base) / USER_CONF)},
                      home=str(base))
    config = load_config(env, strict=False)
    slurm = FakeSlurm(running=[jobid], addresses={host_name(i): host_addr(i) for i in range(nhosts)}, ended=ended)
    nodes = [host_name(i) for i in range(nhosts)]
    hosts = [SimHost(i, base, config, slurm, endpoints, check_order) for i in indexes]
    steps = {}  # phase name -> threading.Event, set from the parent's phase messages

    def thread(h):
        runners.acting_as(h.fake)
        failed = None

        def step(kind, fn):
            try:
                data = fn()
            except Exception as exc:  # noqa: BLE001 - reported; the host goes on to its teardown
                import traceback

                data = {"error": f"{h.name}: {type(exc).__name__}: {getattr(exc, 'message', exc)}",
                        "trace": "".join(traceback.format_exc().splitlines(True)[-6:])}
            out.put((kind, h.index, data))
            return data

        def up():
            h.setup(jobid, uid, nodes)
            h.start_vms(jobid, user)
            return dict(h.timings)

        def checked():
            problems, count, pools = h.check_setup(jobid)
            record = h.ctx.store.get(f"/pcocc/users/{user}/clusters/{jobid}/nodes/{h.name}")
            return {"problems": problems, "objects": count, "pools": pools, "commands": len(h.fake.commands), "record": record}

        def down():
            h.teardown(jobid, uid)
            return {"problems": h.check_teardown(), "timings": dict(h.timings)}

        try:
            h.open_store()
            go.wait()
            failed = "error" in step("up", up)
            steps["check"].wait()
            step("checked", (lambda: {"skipped": True}) if failed else checked)
            steps["stop"].wait()
            step("stopped", (lambda: None) if failed else (lambda: h.stop_vms(jobid, user)))
            steps["down"].wait()
            step("down", down)
        finally:
            h.close()

    for name in ("check", "stop", "down"):
        steps[name] = threading.Event()
    threads = [threading.Thread(target=thread, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    out.put(("ready", indexes[0], None))
    for name in ("check", "stop", "down"):
        while not phase[name].wait(0.5):
            if not any(t.is_alive() for t in threads):
                break
        steps[name].set()
    for t in threads:
        t.join()
    out.put(("requests", indexes[0], requests["n"]))


# --------------------------------------------------------------------------- the whole simulation
def simulate(endpoints, base, hosts, workers=None, jobid=None, check_order=False, cap=600):
    """Set up then tear down one job of `hosts` simulated hosts x 16 VMs on the etcd at
    endpoints; returns the figures and the problems found (an empty list: every check held).

    Phases, each timed from the parent: set-up (every node set up and every VM running, as
    the launcher's wait_started sees it), the checks, the VMs' end, the teardown.
    """
    import pwd

    from pcocc import state
    from pcocc.cluster import VMSpec
    from pcocc.config.loader import load_config
    from pcocc.context import Context
    from pcocc.env import Environment
    from pcocc.store.etcd import EtcdStore

    base = Path(base)
    write_config(base, endpoints)
    uid = os.getuid()
    user = pwd.getpwuid(uid).pw_name
    jobid = jobid or (int(time.time() * 1000) % 1_000_000_000)
    workers = workers or max(1, min(4, hosts // 25 or 1))
    ctx_mp = multiprocessing.get_context("fork")
    go, ended, out = ctx_mp.Event(), ctx_mp.Event(), ctx_mp.Queue()
    phase = {n: ctx_mp.Event() for n in ("check", "stop", "down")}
    slices = [list(range(hosts))[w::workers] for w in range(workers)]
    slices = [s for s in slices if s]
    children = [ctx_mp.Process(target=_worker, args=(s, base, endpoints, hosts, jobid, uid, user, check_order, go, ended, phase, out))
                for s in slices]
    env = Environment(environ={"PCOCC_SYSTEM_CONF_DIR": str(base / "etc"), "PCOCC_USER_CONF_DIR": str(base / USER_CONF)},
                      home=str(base))
    launcher_ctx = Context(env, config=load_config(env, strict=False))
    launcher_ctx.hostname = "simlauncher"
    launcher_ctx._store = EtcdStore(endpoints)
    problems, reports, errors, requests = [], {}, [], 0
    result = {"hosts": hosts, "vms": hosts * VMS_PER_HOST, "jobid": jobid, "workers": len(children)}
    for c in children:
        c.start()
    try:
        _expect(out, "ready", len(children), children, cap, reports, errors)
        from pcocc.batch.slurm import SlurmBackend
        from pcocc.lifecycle import launcher

        backend = SlurmBackend(launcher_ctx)
        tset = launcher_ctx.config.templates
        vms = [VMSpec(r, "sim") for r in range(hosts * VMS_PER_HOST)]  # parse_definition stops at MAX_VMS
        resolved = {"sim": tset.resolve("sim")}
        opts = {"name": f"sim-{hosts}", "definition": f"sim:{len(vms)}", "cwd": str(base)}
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        go.set()
        # the launcher: the job's credentials and the cluster's record, then its wait for every VM
        prefix = state.cluster_prefix(user, jobid)
        try:
            backend.write_credentials(jobid, [])
            info = backend.cluster_info(jobid, vms, resolved, opts, backend="slurm", rundir=None, launcher_host="simlauncher")
            result["record_bytes"] = len(json.dumps(info))
            launcher_ctx.store.put(prefix + "info", info)
            result["record_s"] = time.perf_counter() - t0
            failed = launcher.wait_started(backend, jobid, lambda vms: None, alive=lambda: not errors and all(
                c.is_alive() for c in children), timeout=cap)
            if failed:
                problems.append(f"{len(failed)} VMs ended before running: {failed[0]}")
        except Exception as exc:  # noqa: BLE001 - the launcher's failure is the run's
            problems.append(f"launcher: {type(exc).__name__}: {getattr(exc, 'message', exc)}")
            result["launcher_error"] = problems[-1]
            ended.set()  # the launcher exits: SLURM ends the job, its nodes see it (squeue)
        result["setup_s"] = time.perf_counter() - t0
        _expect(out, "up", hosts, children, cap, reports, errors)
        result["all_up_s"] = time.perf_counter() - t0
        result["loadavg"] = [load0, os.getloadavg()[0]]
        phase["check"].set()
        _expect(out, "checked", hosts, children, cap, reports, errors)
        problems += _check_cluster(reports, hosts, launcher_ctx.store, user, jobid)
        t1 = time.perf_counter()
        phase["stop"].set()
        _expect(out, "stopped", hosts, children, cap, reports, errors)
        # the launcher's end: the cluster's history record (as its VMs stopped by themselves), then
        # its records go
        launcher._record_end(launcher_ctx, jobid, [], {"error": None, "script": None, "status": 0})
        launcher_ctx.store.delete_prefix(prefix)
        phase["down"].set()
        _expect(out, "down", hosts, children, cap, reports, errors)
        result["teardown_s"] = time.perf_counter() - t1
        for (kind, _), data in sorted(reports.items()):
            if kind == "requests":
                continue
            if data and "error" in data:
                errors.append(f"{kind}: {data['error']}")
            elif kind == "down":
                problems += data["problems"]
                result["teardown_problems"] = result.get("teardown_problems", 0) + len(data["problems"])
        counts = {key: n for key, n in reports.items() if key[0] == "requests"}
        counts.update(_drain(out, "requests", len(children) - len(counts), children, 60))
        requests = sum(counts.values())
        pools = launcher_ctx.store.range("/pcocc/global/pools/") | launcher_ctx.store.range("/pcocc/global/pool-owners/")
        mine = {k: v for k, v in pools.items() if str(jobid) in json.dumps(v)}
        if mine:
            problems.append(f"{len(mine)} pool keys of the job left after the teardown, e.g. {next(iter(mine))}")
        left = launcher_ctx.store.range(prefix)
        if left:
            problems.append(f"{len(left)} keys of the cluster left after the teardown")
        result["teardown_problems"] = result.get("teardown_problems", 0) + bool(mine) + bool(left)
    finally:
        go.set()
        for e in phase.values():
            e.set()
        stop_workers(children, out)
        launcher_ctx.close_store()
    ups = [d for (k, _), d in reports.items() if k == "up" and "error" not in d]
    downs = [d["timings"] for (k, _), d in reports.items() if k == "down" and "error" not in d]
    checked = [d for (k, _), d in reports.items() if k == "checked" and "objects" in d]
    result.update({
        "problems": problems + errors, "errors": errors, "requests": requests,
        "hosts_up": len(ups), "objects": sum(d["objects"] for d in checked), "commands": sum(d["commands"] for d in checked),
        "slowest_setup_s": max((d["setup_s"] for d in ups), default=None),
        "median_setup_s": _median([d["setup_s"] for d in ups]),
        "setup_cpu_s": sum(d["setup_cpu_s"] for d in ups), "vms_cpu_s": sum(d["vms_cpu_s"] for d in ups),
        "median_wait_s": _median([d["record"].get("timings", {}).get("wait") for d in checked if d.get("record")]),
        "median_create_s": _median([d["record"].get("timings", {}).get("create") for d in checked if d.get("record")]),
        "slowest_teardown_s": max((d.get("teardown_s", 0) for d in downs), default=None),
    })
    return result


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _expect(out, kind, count, children, cap, reports, errors):
    """Collect `count` messages of `kind` (an error counts for one); others are kept too."""
    deadline = time.monotonic() + cap
    got = sum(1 for (k, _) in reports if k == kind)
    while got < count:
        try:
            k, index, data = out.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                errors.append(f"{count - got} hosts did not reach '{kind}' within {cap} s")
                return
            if not any(c.is_alive() for c in children):
                errors.append(f"every worker ended before '{kind}'")
                return
            continue
        reports[(k, index)] = data
        got += k == kind


def _drain(out, kind, count, children, cap):
    got, deadline = {}, time.monotonic() + cap
    while len(got) < count and time.monotonic() < deadline:
        try:
            k, index, data = out.get(timeout=0.5)
        except queue.Empty:
            continue
        if k == kind:
            got[(k, index)] = data
    return got


def _check_cluster(reports, hosts, store, user, jobid):
    """The cluster-wide checks after the set-up: every node complete, the rank map whole, no id twice."""
    import ipaddress

    problems = []
    records = {i: d.get("record") for (k, i), d in reports.items() if k == "checked"}
    for (k, i), d in sorted(reports.items()):
        if k == "checked":
            problems += d.get("problems", [])
    vnis, ext, ranks = set(), {}, {}
    for i, rec in records.items():
        if not rec or rec.get("state") != "complete":
            problems.append(f"{host_name(i)}: node state {rec and rec.get('state')}: {rec and rec.get('error')}")
            continue
        pub = rec["objects"]["pub"]
        vnis.add(pub["vni"])
        ports = [v["host_port"] for v in pub["vms"].values()]
        if len(set(ports)) != len(ports):
            problems.append(f"{host_name(i)}: a host port twice: {sorted(ports)}")
        for r, v in pub["vms"].items():
            if v["ext_ip"] in ext:
                problems.append(f"external address {v['ext_ip']} given to vm{ext[v['ext_ip']]} and vm{r}")
            ext[v["ext_ip"]] = r
            if r in ranks:
                problems.append(f"vm{r} set up on {host_name(ranks[r])} and {host_name(i)}")
            ranks[r] = i
            if ipaddress.ip_address(v["ip"]) != ipaddress.ip_network("10.0.0.0/8")[int(r) + 1]:
                problems.append(f"vm{r}: internal address {v['ip']}")
        if sorted(map(int, pub["vms"])) != list(range(i * VMS_PER_HOST, (i + 1) * VMS_PER_HOST)):
            problems.append(f"{host_name(i)}: VMs {sorted(map(int, pub['vms']))}, not its ranks")
    if len(vnis) != 1:
        problems.append(f"the job's nodes have {len(vnis)} VXLAN ids: {sorted(vnis)[:5]}")
    if len(ranks) != hosts * VMS_PER_HOST:
        problems.append(f"{len(ranks)} VMs in the rank map, not {hosts * VMS_PER_HOST}")
    # the store: each node's pool entries name owners that hold exactly its ids
    from pcocc.allocator import owner_key

    owners = store.range("/pcocc/global/pool-owners/")
    for (k, i), d in reports.items():
        if k != "checked":
            continue
        for e in d.get("pools", ()):
            if e["kind"] == "pool-own":
                key = owner_key(e["args"]["pool"], e["args"]["owner"])
                held = owners.get(key)
                if not held or len(held.get("ids", [])) != VMS_PER_HOST:
                    problems.append(f"{host_name(i)}: pool {e['args']['pool']}: owner {e['args']['owner']} holds {held} ({key})")
    vms = store.range(state_prefix(user, jobid) + "vms/")
    running = sum(v.get("state") == "running" for v in vms.values())
    if running != hosts * VMS_PER_HOST:
        problems.append(f"{running} VMs running, not {hosts * VMS_PER_HOST}")
    return problems


def state_prefix(user, jobid):
    from pcocc import state

    return state.cluster_prefix(user, jobid)
