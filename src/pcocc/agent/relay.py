"""Fan-out to many VMs through a tree of host relays (issue 15).

Who relays, with which credentials, and why no privilege is new:

* On each host, one VM process of the job (``pcocc internal run``, running as the cluster
  owner) is the *host leader*: the lowest targeted rank of that host.  It serves the
  streaming op ``relay`` of its control endpoint (``lifecycle.control.ControlHandler.op_relay``).
* It reaches the job's VMs of its own host (itself included) on their unix sockets
  (``ControlServer(unix_path=...)``, in each VM's private run dir: the job's run dir is 0700
  and the owner's, and the endpoint checks the peer's uid with SO_PEERCRED): no TLS there.
* It reaches its child leaders (other hosts) by mutual TLS with the cluster owner's client
  credentials, read from the store where the CLI reads them
  (``state.cluster_prefix(user, jobid) + "client"``, ``BatchManager.credentials``): the VM
  process runs as the owner, who may read them; the child's endpoint checks the CN as for
  the CLI.  So a relay does with the owner's credentials only what the owner may do.
* The CLI (``cli.access``) opens mutual-TLS connections to at most ``WIDTH`` leaders; each
  relays to up to ``WIDTH`` subtrees of further leaders: depth log_WIDTH(hosts), and each
  process does at most WIDTH + 1 TLS handshakes.

The op (one JSON line each way, ``agent.endpoint``'s streaming protocol)::

    -> {"op": "relay", "args": {"op": "exec_stream", "args": {...}, "plan": PLAN, "timeout": 60}}
    <- {"ok": true, "more": true, "event": {"up": []}}                  first, at once
    <- {"ok": true, "more": true, "event": {"up": [ITEM, ...]}}         batches, and every HEARTBEAT s
    -> {"vm": "vm12" | "all", "message": {...}}                         e.g. stdin, {"signal": "KILL"}
    -> {"vm": "vm12", "drop": true}                                     close that VM's stream
    <- {"ok": true, "result": {"vms": N}}                               once every VM had its final item

    ITEM: {"vm": NAME, "event": {...}}   an event of that VM's op (its first one opens it)
          {"vm": NAME, "result": ...}    its final answer
          {"vm": NAME, "error": "message", "kind": "permission|notfound|timeout|usage|error"}
    PLAN: {"links": [LINK, ...]}
    LINK: {"vm": NAME, "unix": PATH}                                    a VM of this host
          {"vm": NAME, "address": [HOST, PORT]}                         a VM by TLS (the direct design)
          {"relay": NAME, "host": HOST, "address": [HOST, PORT], "plan": PLAN}  a child leader

A plain op (reset, monitor_cmd) gives one result or error item per VM (a streaming one:
exec_stream, ckpt, its events first).  Messages down
are queued per link until its first answer (an endpoint takes nothing before its first
event), and a child relay's messages to "all" reach its VMs as they open.  Every VM gets
exactly one final item: a VM whose first answer does not come within ``timeout`` seconds
gets a timeout error; a child relay that closes, fails, or is silent for ``LOST_AFTER``
seconds (it sends at least every ``HEARTBEAT`` s) gives each of its VMs still running
"relay vmK on HOST lost: REASON".  An upstream that leaves (Ctrl-C, SIGKILL, a lost node)
closes every connection below it: each VM sees its client leave (exec kills its command).

``Fanout`` is the multiplexer both sides use: the relay op, and the CLI at the root (its
plan: the top leaders, or one direct TLS link per VM for VM records without a unix socket).
"""

import collections
import logging
import os
import queue
import select
import socket
import threading
import time

from pcocc.agent.endpoint import AgentError, ClientGone, UnixClient, _KINDS
from pcocc.errors import PcoccError, UsageError

log = logging.getLogger(__name__)

WIDTH = 16  # links per relay and from the CLI (the original pcocc's tree width)
OPEN_TIMEOUT = 60.0  # seconds for a VM's first answer (as _ExecRun's ControlClient timeout)
HEARTBEAT = 5.0  # seconds between two messages of a relay at most (an empty batch when idle)
COALESCE = 0.003  # seconds a relay holds items after a message up, so that a burst goes in one (fewer TLS records and parses above)
LOST_AFTER = 30.0  # seconds of silence after which a child relay is taken as lost (6 heartbeats)
_KEEPALIVE = ((socket.TCP_KEEPIDLE, 10), (socket.TCP_KEEPINTVL, 5), (socket.TCP_KEEPCNT, 3))  # a dead host: ~25 s


def plan(vms, width=None):
    """The root links for VM records (running ones, in rank order: dicts with name, host,
    control [host, port] and, from VM processes that serve one, relay: their unix socket).

    Every record has its unix socket: a tree of host leaders (each host's VMs under its
    first VM; hosts in order of their first VM, split into ``width`` contiguous subtrees at
    each level).  Else (records of an older pcocc): one direct TLS link per VM, as before.
    """
    vms = list(vms)
    width = width or WIDTH
    if not vms or not all(vm.get("relay") and vm.get("host") for vm in vms):
        return [{"vm": vm["name"], "address": list(vm["control"])} for vm in vms]
    groups = collections.OrderedDict()
    for vm in vms:
        groups.setdefault(vm["host"], []).append(vm)
    return _subtrees(list(groups.values()), width)


def _subtrees(groups, width):
    n = len(groups)
    k = min(width, n)
    links = []
    for i in range(k):
        chunk = groups[i * n // k:(i + 1) * n // k]
        head, rest = chunk[0], chunk[1:]
        leader = head[0]
        links.append({"relay": leader["name"], "host": leader["host"], "address": list(leader["control"]),
                      "plan": {"links": _subtrees(rest, width) + [{"vm": vm["name"], "unix": vm["relay"]} for vm in head]}})
    return links


def names_of(link):
    """The VM names a link reaches, in plan order."""
    if "relay" in link:
        return [n for sub in link["plan"]["links"] for n in names_of(sub)]
    return [link["vm"]]


def depth(links):
    """Hops from the root to the deepest VM (1: direct)."""
    return max((1 + depth(l["plan"]["links"]) if "relay" in l else 1 for l in links), default=0)


def _kind(exc):
    return next((k for cls, k in _KINDS if isinstance(exc, cls)), "error")


class _Link:
    def __init__(self, spec):
        self.spec = spec
        self.relay = "relay" in spec
        self.names = names_of(spec)
        self.left = set(self.names)  # names still without their final item
        self.label = f"relay {spec['relay']} on {spec.get('host')}" if self.relay else spec["vm"]
        self.client = self.stream = None
        self.opened = False  # its first answer came: messages go at once
        self.queue = []  # messages waiting for it
        self.deadline = None  # its first answer by then (monotonic)
        self.heard = None  # monotonic time of its last message (relays)
        self.done = False


class Fanout:
    """One op on many VMs over links (see the module's docstring), driven by pump() from one
    thread; TLS links are connected by up to ``parallel`` threads meanwhile.

    connect(link, timeout): a ControlClient for a TLS link (the caller's credentials);
    open_timeout: seconds for each link's connection and first answer.
    """

    def __init__(self, links, op, args, *, connect, open_timeout=OPEN_TIMEOUT, parallel=WIDTH, lost_after=LOST_AFTER):
        self.op, self.args = op, dict(args)
        self.connect = connect
        self.open_timeout = float(open_timeout)
        self.lost_after = lost_after
        self.parallel = parallel
        self.links = [_Link(spec) for spec in links]
        self.by_name = {n: link for link in self.links for n in link.names}
        self.remaining = set(self.by_name)  # names without their final item yet
        self._items = []  # items found outside pump(): failed sends, connection errors
        self._opened = queue.SimpleQueue()  # (link, client or None, stream or error) from the threads
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r = self._wake_w = None

    def start(self):
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        remote = queue.SimpleQueue()
        for link in self.links:
            if "unix" not in link.spec:
                remote.put(link)
        # daemon threads, not an executor's (joined at exit): a connect stuck on a dead host must
        # not keep the CLI alive after a second Ctrl-C
        for _ in range(min(self.parallel, remote.qsize())):
            threading.Thread(target=self._open_each, args=(remote,), name="pcocc-fanout", daemon=True).start()
        for link in self.links:  # the host's own VMs: a unix connect, at once
            if "unix" in link.spec:
                self._open(link)
        return self

    def _open_each(self, links):
        while True:
            try:
                link = links.get_nowait()
            except queue.Empty:
                return
            self._open(link)

    def _request(self, link):
        if link.relay:
            return "relay", {"op": self.op, "args": self.args, "plan": link.spec["plan"], "timeout": self.open_timeout}
        return self.op, self.args

    def _open(self, link):
        """Connects a link and sends its request (in a thread for TLS links); never raises."""
        client = None
        try:
            if "unix" in link.spec:
                client = UnixClient(link.spec["unix"], timeout=self.open_timeout)
            else:
                client = self.connect(link.spec, self.open_timeout)
            op, args = self._request(link)
            stream = client.open(op, **args)
            if link.relay:
                _keepalive(client)
            outcome = (link, client, stream)
        except PcoccError as exc:
            if client is not None:
                client.close()
            outcome = (link, None, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must still give each VM its result
            log.exception("fan-out: opening %s", link.label)
            if client is not None:
                client.close()
            outcome = (link, None, AgentError(f"internal error: {type(exc).__name__}: {exc}"))
        with self._lock:
            if self._closed:
                if client is not None:
                    client.close()
                return
            self._opened.put(outcome)
            try:
                os.write(self._wake_w, b"o")
            except OSError:  # full: the loop looks anyway
                pass

    def _take_opened(self, items):
        while True:
            try:
                link, client, got = self._opened.get_nowait()
            except queue.Empty:
                return
            if link.done:
                if client is not None:
                    client.close()
                continue
            if client is None:
                self._fail_link(link, got.message if not link.relay else f"{link.label} lost: {got.message}", _kind(got), items)
                continue
            link.client, link.stream = client, got
            now = time.monotonic()
            link.deadline = now + self.open_timeout
            link.heard = now
            client.set_timeout(self.open_timeout)  # each send's bound (a peer that takes nothing)

    # ---- down ------------------------------------------------------------------------------------

    def send(self, target, message):
        """Sends message to a VM by name, or to "all"; a link still opening gets it once open.
        A failure is an error item of the next pump() (never raised)."""
        if target == "all":
            for link in self.links:
                if not link.done:
                    self._send(link, {"vm": "all", "message": message} if link.relay else message)
            return
        link = self.by_name.get(target)
        if link is not None and not link.done and target in link.left:
            self._send(link, {"vm": target, "message": message} if link.relay else message)

    def drop(self, name):
        """Forget a VM (e.g. its output was malformed): its stream is closed below, and it gets
        no item any more."""
        link = self.by_name.get(name)
        if link is None or link.done or name not in link.left:
            return
        link.left.discard(name)
        self.remaining.discard(name)
        if link.relay:
            self._send(link, {"vm": name, "drop": True})
        else:
            self._close(link)

    def _send(self, link, wire):
        if not link.opened:
            link.queue.append(wire)
            return
        try:
            link.stream.send(wire)
        except PcoccError as exc:
            self._fail_link(link, f"{link.label} lost: {exc.message}" if link.relay else exc.message, "error", self._items)

    # ---- up --------------------------------------------------------------------------------------

    def selectables(self):
        return [link.stream for link in self.links if link.stream is not None and not link.done]

    def pump(self, timeout, extra=()):
        """Waits at most timeout seconds for something from the links or in extra (selectable
        objects or fds of the caller), and returns (items, the members of extra readable)."""
        items, self._items = self._items, []
        self._take_opened(items)
        # deadlines are checked only after the poll below has read what waits in the sockets:
        # a caller that was slow (blocked writing to a full stdout) finds the links' heartbeats
        # there, not a silence (the review found every VM failed after a 40 s pager)
        live = self.selectables()
        if items or any(s.ready() for s in live):
            timeout = 0
        else:
            deadlines = [link.deadline if not link.opened else link.heard + self.lost_after
                         for link in self.links if link.stream is not None and not link.done and (link.relay or not link.opened)]
            if deadlines:
                timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic() + 0.01))
        poller = select.poll()
        fds = {}
        for obj in [*live, self._wake_r, *extra]:
            fd = obj if isinstance(obj, int) else obj.fileno()
            fds.setdefault(fd, []).append(obj)
            poller.register(fd, select.POLLIN)
        try:
            events = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        except InterruptedError:
            events = []
        readable = {fd for fd, _ in events}
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass
            self._take_opened(items)
        for link in self.links:
            if link.stream is not None and not link.done and (link.stream.fileno() in readable or link.stream.ready()):
                self._read(link, items)
        self._check_deadlines(items)
        items.extend(self._items)
        self._items = []
        ready = [obj for obj in extra if (obj if isinstance(obj, int) else obj.fileno()) in readable]
        return items, ready

    def _read(self, link, items):
        while not link.done:
            try:
                kind, value = link.stream.receive(0)
            except PcoccError as exc:
                if link.relay:
                    self._fail_link(link, f"{link.label} lost: {exc.message}", "error", items)
                else:
                    self._fail_link(link, exc.message, _kind(exc), items)
                return
            if kind is None:
                return
            link.heard = time.monotonic()
            if not link.opened:
                self._opened_now(link)
            if not link.relay:
                name = link.spec["vm"]
                if kind == "event":
                    items.append({"vm": name, "event": value})
                else:
                    items.append({"vm": name, "result": value})
                    self._finished(link, name)
                continue
            if kind == "result":
                self._fail_link(link, f"{link.label} ended without an answer for it", "error", items)
                return
            for item in value.get("up", ()) if isinstance(value, dict) else ():
                name = item.get("vm") if isinstance(item, dict) else None
                if name not in link.left:  # not ours, or already final: never twice
                    continue
                items.append(item)
                if "result" in item or "error" in item:
                    self._finished(link, name)

    def _opened_now(self, link):
        link.opened = True
        queued, link.queue = link.queue, []
        for wire in queued:
            self._send(link, wire)
            if link.done:
                return

    def _finished(self, link, name):
        link.left.discard(name)
        self.remaining.discard(name)
        if not link.left:
            self._close(link)

    def _fail_link(self, link, message, kind, items):
        """Each VM of the link still running gets message (kind) as its error."""
        for name in link.names:
            if name in link.left:
                items.append({"vm": name, "error": message, "kind": kind})
                self.remaining.discard(name)
        link.left.clear()
        self._close(link)

    def _check_deadlines(self, items):
        now = time.monotonic()
        for link in self.links:
            if link.done or link.stream is None:
                continue
            if not link.opened and now > link.deadline:
                what = f"{link.label} lost: no answer" if link.relay else "no answer from its control endpoint"
                self._fail_link(link, f"{what} within {self.open_timeout:g} s", "timeout", items)
            elif link.relay and link.opened and now - link.heard > self.lost_after:
                self._fail_link(link, f"{link.label} lost: silent for {self.lost_after:g} s", "timeout", items)

    def _close(self, link):
        link.done = True
        if link.client is not None:
            link.client.close()

    def close(self):
        """Closes every connection (the VMs below see their client leave); safe twice."""
        with self._lock:
            self._closed = True
        for link in self.links:
            self._close(link)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def _keepalive(client):
    sock = getattr(client, "_sock", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in _KEEPALIVE:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError:
        pass


MAX_TIMEOUT = 24 * 3600.0  # seconds a relay request may give a VM for its first answer
MAX_DEPTH = 64  # levels of a plan (log16 of any cluster is a few; deeper is a malformed plan)


def _plan_problem(links, depth_left):
    """What is wrong in a plan's links (the shapes of the module's docstring), or None. The plan
    comes from the cluster's owner only (TLS or the unix socket's uid): checked so that a
    malformed one is a one-line refusal, not a traceback in the VM's log."""
    if depth_left <= 0:
        return f"deeper than {MAX_DEPTH} levels"
    if not isinstance(links, list):
        return "links must be a list"
    for link in links:
        if not isinstance(link, dict):
            return "a link must be a mapping"
        if "relay" in link:
            if not (isinstance(link["relay"], str) and _is_address(link.get("address")) and isinstance(link.get("plan"), dict)):
                return "a relay link needs relay (a name), address [host, port] and plan"
            problem = _plan_problem(link["plan"].get("links"), depth_left - 1)
            if problem:
                return problem
        elif not isinstance(link.get("vm"), str):
            return "a link needs vm (a name) or relay"
        elif "unix" in link:
            if not isinstance(link["unix"], str) or not link["unix"]:
                return "unix must be a socket path"
        elif not _is_address(link.get("address")):
            return "a VM link needs unix (a path) or address [host, port]"
    return None


def _is_address(address):
    """Whether address is [host, port] as the plans carry them."""
    return (isinstance(address, list) and len(address) == 2 and isinstance(address[0], str)
            and isinstance(address[1], int) and not isinstance(address[1], bool))


def serve(stream, op, args, plan, connect, timeout=None):
    """The ``relay`` op at a host leader: runs op(**args) on every VM of plan (see the module's
    docstring) and sends their items up ``stream`` in batches; returns {"vms": count}.

    connect(link, timeout): a ControlClient with the owner's credentials (the VM process's
    ControlHandler gives it).  Raises ClientGone when the upstream left (every connection
    below is closed then), UsageError for a malformed request or plan (_plan_problem).
    """
    links = (plan or {}).get("links") if isinstance(plan, dict) else None
    if not isinstance(links, list) or not isinstance(args, dict) or not isinstance(op, str):
        raise UsageError("bad relay request: op, args and plan {links} expected")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT):
        raise UsageError(f"bad relay request: timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    problem = _plan_problem(links, depth_left=MAX_DEPTH)
    if problem:
        raise UsageError(f"bad relay plan: {problem}")
    fan = Fanout(links, op, args, connect=connect, open_timeout=timeout or OPEN_TIMEOUT)
    count = len(fan.by_name)
    fan.start()
    try:
        stream.send({"up": []})  # the upstream may send from now on
        last = time.monotonic() - COALESCE  # the first items go up at once
        held = []  # items not sent yet: a burst goes up in one message
        while fan.remaining or held:
            until = last + (COALESCE if held else HEARTBEAT)
            wait = 0 if stream.ready() else max(0.0, min(1.0, until - time.monotonic()))
            items, ready = fan.pump(wait, [stream])
            if ready or stream.ready():
                msg = stream.receive(0)
                while msg is not None:
                    target = msg.get("vm")
                    if isinstance(target, str):
                        if msg.get("drop"):
                            fan.drop(target)
                        elif isinstance(msg.get("message"), dict):
                            fan.send(target, msg["message"])
                    msg = stream.receive(0)
            held += items
            now = time.monotonic()
            if (held and now - last >= COALESCE) or now - last >= HEARTBEAT:
                stream.send({"up": held})
                held, last = [], now
        return {"vms": count}
    except ClientGone:
        log.info("relay: its client left: closing the streams of %d VMs", len(fan.remaining))
        raise
    finally:
        fan.close()


def call(links, op, args, *, connect, timeout=OPEN_TIMEOUT):
    """Runs the plain op ``op(**args)`` on every VM of links (``plan``); returns
    {name: (True, result) or (False, error message)}, one entry per VM, in no order.
    timeout: seconds for each VM's answer (at each hop).  Never raises for one VM's failure."""
    results = {}
    with Fanout(links, op, args, connect=connect, open_timeout=timeout) as fan:
        while fan.remaining:
            items, _ = fan.pump(1.0)
            for item in items:
                if "result" in item:
                    results[item["vm"]] = (True, item["result"])
                elif "error" in item:
                    results[item["vm"]] = (False, str(item["error"]))
    return results
