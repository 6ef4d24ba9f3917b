"""The fan-out through host relays (agent.relay): real ControlServers on loopback TLS and
unix sockets, a fake VM handler behind them (FakeVM: no guest), trees of 1 to 3 levels,
stdin and signals down, a relay lost mid-stream, the unix socket's uid check, and VM
records of an older pcocc (no unix socket: direct TLS)."""

import io
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from pcocc.agent import pki, relay
from pcocc.agent.endpoint import ControlClient, ControlServer, UnixClient, decode_bytes, encode_bytes, peer_credentials, streaming
from pcocc.cli.access import _ExecRun

OWNER = "alice"


@pytest.fixture(scope="module")
def creds():
    ca = pki.make_ca("cluster-1")
    return {"ca": ca, "server": pki.issue(*ca, "vm", server=True, ips=("127.0.0.1",)), "owner": pki.issue(*ca, OWNER)}


def tls_client(creds, address, timeout):
    cert, key = creds["owner"]
    return ControlClient(tuple(address), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, timeout=timeout)


class FakeVM:
    """A fake VM's control handler (no guest): exec_stream runs a tiny fake command language,
    and relay is the real one (agent.relay.serve) with the owner's credentials.

    argv[0]: "echo WORDS" prints them; "cat" echoes its stdin until its end, with credits;
    "sleep" waits for a signal (status 137, killed); "fail" raises an error before its first event.
    """

    def __init__(self, name, creds):
        self.name, self.creds = name, creds
        self.signals = []

    def op_ping(self):
        return {"pong": self.name}

    def op_slow(self, seconds):
        time.sleep(seconds)
        return {}

    @streaming
    def op_exec_stream(self, stream, argv, stdin=False, user=None, timeout=None):
        from pcocc.errors import PcoccError

        cmd = argv[-1]
        if cmd == "fail":
            raise PcoccError(f"{self.name} cannot run it")
        stream.send({"started": True, "stdin_window": 1000 if stdin else 0})
        if cmd.startswith("echo "):
            stream.send({"out_b64": encode_bytes((cmd[5:] + "\n").encode())})
            return {"status": 0}
        while True:
            msg = stream.receive(5.0)
            if msg is None:
                continue
            if "stdin_b64" in msg:
                data = decode_bytes(msg["stdin_b64"])
                stream.send({"out_b64": encode_bytes(data)})
                stream.send({"stdin_credit": len(data)})
            elif msg.get("stdin_eof"):
                return {"status": 0}
            elif msg.get("signal"):
                self.signals.append(msg["signal"])
                return {"status": 137, "killed": True}

    @streaming
    def op_relay(self, stream, op, args, plan, timeout=None):
        return relay.serve(stream, op, args, plan, lambda link, t: tls_client(self.creds, link["address"], t), timeout)


class Hosts:
    """hosts x per VMs, each VM a ControlServer (TLS on loopback, and a unix socket in its
    host's private directory); records as the store holds them (old=True: no unix socket)."""

    def __init__(self, creds, tmp_path, hosts, per, old=False):
        self.creds = creds
        self.servers, self.vms, self.handlers = [], [], []
        cert, key = creds["server"]
        for h in range(hosts):
            hostdir = tmp_path / f"h{h}"
            hostdir.mkdir(mode=0o700)
            for i in range(per):
                rank = h * per + i
                handler = FakeVM(f"vm{rank}", creds)
                server = ControlServer(handler, ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER,
                                       unix_path=None if old else str(hostdir / f"vm{rank}.sock")).start()
                self.servers.append(server)
                self.handlers.append(handler)
                record = {"name": f"vm{rank}", "rank": rank, "state": "running", "host": f"h{h}", "control": list(server.address)}
                if not old:
                    record["relay"] = server.unix_path
                self.vms.append(record)

    def targets(self):
        return SimpleNamespace(vms=self.vms, ranks=list(range(len(self.vms))),
                               client=lambda rank, timeout: tls_client(self.creds, self.vms[rank]["control"], timeout),
                               connect=lambda address, timeout: tls_client(self.creds, address, timeout))

    def exec(self, command, stdin=None):
        """(status, stdout, stderr) of the CLI's exec loop over every VM."""
        out, err = io.TextIOWrapper(io.BytesIO(), write_through=True), io.TextIOWrapper(io.BytesIO(), write_through=True)
        app = SimpleNamespace(env=SimpleNamespace(stdout=out, stderr=err))
        status = _ExecRun(app, self.targets(), {"argv": ["/bin/sh", "-c", command], "user": None}, stdin, False).run()
        return status, out.buffer.getvalue(), err.buffer.getvalue()

    def fanout(self, op, args, timeout=5.0):
        return relay.Fanout(relay.plan(self.vms), op, args, connect=lambda link, t: tls_client(self.creds, link["address"], t),
                            open_timeout=timeout)

    def close(self):
        for s in self.servers:
            s.stop(timeout=2, drain=0.5)


@pytest.fixture
def make(creds, tmp_path):
    made = []

    def build(hosts, per, old=False):
        made.append(Hosts(creds, tmp_path, hosts, per, old))
        return made[-1]

    yield build
    for h in made:
        h.close()


@pytest.fixture
def narrow(monkeypatch):
    """A tree of width 2, so that a few hosts make several levels."""
    monkeypatch.setattr(relay, "WIDTH", 2)


def pump_until(fan, done, limit=20.0):
    items = []
    end = time.monotonic() + limit
    while not done(items):
        assert time.monotonic() < end, f"not done: {items}"
        got, _ = fan.pump(0.2)
        items += got
    return items


# ---- the plan -------------------------------------------------------------------------------------


def test_the_plan_puts_each_host_under_its_first_vm_and_every_vm_once():
    vms = [{"name": f"vm{r}", "host": f"h{r // 3}", "control": ["10.0.0.1", 1000 + r], "relay": f"/run/vm{r}.sock"} for r in range(30)]
    links = relay.plan(vms, width=2)
    assert [n for link in links for n in relay.names_of(link)] != []
    assert sorted(n for link in links for n in relay.names_of(link)) == sorted(v["name"] for v in vms)
    assert len(links) == 2 and relay.depth(links) >= 3  # 10 hosts, width 2: a tree, not a star

    def leaders(link):
        own = [l for l in link["plan"]["links"] if "unix" in l]
        assert link["relay"] == own[0]["vm"]  # the host's first VM leads it, and reaches its VMs by unix socket
        assert {int(l["vm"][2:]) // 3 for l in own} == {int(link["relay"][2:]) // 3}
        assert len(link["plan"]["links"]) <= 2 + 3
        for sub in link["plan"]["links"]:
            if "relay" in sub:
                leaders(sub)

    for link in links:
        leaders(link)
    assert relay.depth(relay.plan(vms[:3])) == 2  # one host: its leader, then its VMs


def test_old_records_without_a_unix_socket_are_reached_directly():
    vms = [{"name": f"vm{r}", "host": "h0", "control": ["10.0.0.1", 1000 + r], "relay": f"/run/vm{r}.sock"} for r in range(3)]
    del vms[1]["relay"]  # one VM of an older pcocc: every VM is reached as before
    assert relay.plan(vms) == [{"vm": v["name"], "address": v["control"]} for v in vms]


# ---- exec through the tree ------------------------------------------------------------------------


def test_exec_streams_through_a_tree_with_one_result_per_vm(make, narrow):
    hosts = make(5, 2)
    assert relay.depth(relay.plan(hosts.vms)) == 3  # client -> leader -> leader -> VM's unix socket
    status, out, err = hosts.exec("echo hello")
    assert status == 0, err
    assert sorted(out.splitlines()) == sorted(f"vm{r}: hello".encode() for r in range(10))


def test_old_records_still_work_through_direct_tls(make):
    hosts = make(2, 2, old=True)
    assert all("address" in link and "vm" in link for link in relay.plan(hosts.vms))
    status, out, err = hosts.exec("echo old")
    assert status == 0, err
    assert sorted(out.splitlines()) == sorted(f"vm{r}: old".encode() for r in range(4))


def test_stdin_goes_to_every_vm_through_the_tree_with_credits(make, narrow):
    hosts = make(3, 2)
    r, w = os.pipe()
    data = b"".join(b"line %d\n" % i for i in range(2000))  # 17 kB: many windows of 1000 bytes
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        status, out, err = hosts.exec("cat", stdin=r)
    finally:
        writer.join()
        os.close(r)
    assert status == 0, err
    for rank in range(6):
        assert b"".join(line[len(f"vm{rank}: "):] + b"\n" for line in out.splitlines() if line.startswith(b"vm%d: " % rank)) == data


def test_signals_and_stdin_go_down_by_vm_or_to_all(make, narrow):
    hosts = make(3, 2)
    fan = hosts.fanout("exec_stream", {"argv": ["sleep"], "stdin": True})
    with fan:
        items = pump_until(fan, lambda items: sum(1 for i in items if "event" in i) == 6)  # all started
        fan.send("vm5", {"stdin_b64": encode_bytes(b"to five\n")})
        fan.send("vm3", {"signal": "KILL"})
        items = pump_until(fan, lambda items: any("result" in i for i in items) and any("event" in i and "out_b64" in i["event"] for i in items))
        assert [i["vm"] for i in items if "result" in i] == ["vm3"]
        assert [(i["vm"], decode_bytes(i["event"]["out_b64"])) for i in items if "out_b64" in i.get("event", {})] == [("vm5", b"to five\n")]
        fan.send("all", {"signal": "INT"})
        items = pump_until(fan, lambda items: not fan.remaining)
        assert sorted(i["vm"] for i in items if "result" in i) == ["vm0", "vm1", "vm2", "vm4", "vm5"]
    assert [h.signals for h in hosts.handlers] == [["INT"]] * 3 + [["KILL"]] + [["INT"]] * 2


def test_a_signal_sent_before_a_vm_started_reaches_it_once_it_did(make):
    hosts = make(1, 2)
    fan = hosts.fanout("exec_stream", {"argv": ["sleep"], "stdin": False})
    with fan:
        fan.send("all", {"signal": "KILL"})  # at once: queued at each hop until each VM's first event
        items = pump_until(fan, lambda items: not fan.remaining)
    assert sorted((i["vm"], i["result"]["status"]) for i in items if "result" in i) == [("vm0", 137), ("vm1", 137)]


def test_a_relay_killed_mid_stream_gives_an_error_for_each_of_its_vms(make, narrow):
    hosts = make(4, 2)
    links = relay.plan(hosts.vms)
    victim = next(l for top in links for l in top["plan"]["links"] if "relay" in l)  # a second-level leader
    lost = set(relay.names_of(victim))
    fan = hosts.fanout("exec_stream", {"argv": ["sleep"], "stdin": False})
    with fan:
        pump_until(fan, lambda items: sum(1 for i in items if "event" in i) == 8)
        hosts.servers[int(victim["relay"][2:])].stop(timeout=1, drain=0)  # its process ends: every connection cut
        items = pump_until(fan, lambda items: lost <= {i["vm"] for i in items if "error" in i})
        errors = {i["vm"]: i["error"] for i in items if "error" in i}
        assert set(errors) == lost
        assert all(e.startswith(f"relay {victim['relay']} on {victim['host']} lost: ") for e in errors.values()), errors
        fan.send("all", {"signal": "KILL"})
        items = pump_until(fan, lambda items: not fan.remaining)
        assert {i["vm"] for i in items if "result" in i} == {f"vm{r}" for r in range(8)} - lost  # the others answer


def test_a_caller_slow_to_pump_finds_heartbeats_not_a_silence(make, monkeypatch):
    """The CLI blocked writing to a full stdout (a pager) for longer than lost_after: the
    relays' heartbeats wait in its sockets. Its next pump reads them before it judges any link
    silent (it used to fail every VM, and kill their commands, at once)."""
    import select as _select

    monkeypatch.setattr(relay, "HEARTBEAT", 0.05)
    hosts = make(2, 1)
    fan = relay.Fanout(relay.plan(hosts.vms), "exec_stream", {"argv": ["sleep"], "stdin": False},
                       connect=lambda link, t: tls_client(hosts.creds, link["address"], t), open_timeout=5.0, lost_after=0.5)
    with fan:
        pump_until(fan, lambda items: sum(1 for i in items if "event" in i) == 2)
        links = [link for link in fan.links if link.relay]
        assert links

        def stalled():  # what a caller finds after a long stall: data waiting, and nothing heard for long
            waiting = _select.select([l.stream for l in links], [], [], 0.05)[0]
            return len(waiting) == len(links) and all(time.monotonic() - l.heard > fan.lost_after for l in links)

        end = time.monotonic() + 60
        while not stalled():
            assert time.monotonic() < end, "the relays sent no heartbeat"
        items, _ = fan.pump(0)
        assert not [i for i in items if "error" in i], items
        fan.send("all", {"signal": "KILL"})
        items = pump_until(fan, lambda items: not fan.remaining)
        assert {i["vm"] for i in items if "result" in i} == {"vm0", "vm1"}


def test_the_cli_tells_each_vm_of_a_lost_relay_and_exits_255(make):
    hosts = make(2, 2)
    hosts.servers[2].stop(timeout=1, drain=0)  # host h1's leader is gone before the exec
    status, out, err = hosts.exec("echo hi")
    assert status == 255
    assert sorted(out.splitlines()) == [b"vm0: hi", b"vm1: hi"]
    lines = err.decode().splitlines()
    assert len(lines) == 2, lines
    assert all(l.startswith(f"pcocc: error: vm{r}: relay vm2 on h1 lost: ") for l, r in zip(sorted(lines), (2, 3))), lines


def test_a_vm_that_fails_before_its_first_event_is_an_error_of_its_own(make):
    hosts = make(1, 3)
    fan = hosts.fanout("exec_stream", {"argv": ["fail"], "stdin": False})
    with fan:
        items = pump_until(fan, lambda items: not fan.remaining)
    assert sorted((i["vm"], i["error"]) for i in items) == [(f"vm{r}", f"vm{r} cannot run it") for r in range(3)]


def test_plain_ops_give_one_result_per_vm_and_a_timeout_per_hop(make, narrow):
    hosts = make(3, 2)
    connect = lambda link, t: tls_client(hosts.creds, link["address"], t)  # noqa: E731
    assert relay.call(relay.plan(hosts.vms), "ping", {}, connect=connect) == {f"vm{r}": (True, {"pong": f"vm{r}"}) for r in range(6)}
    hosts.servers[5].stop(timeout=1, drain=0)  # vm5 gone: its unix socket refuses
    got = relay.call(relay.plan(hosts.vms), "slow", {"seconds": 3}, connect=connect, timeout=0.5)
    assert set(got) == {f"vm{r}" for r in range(6)}
    assert all(not ok for ok, _ in got.values())
    assert "cannot reach" in got["vm5"][1] and all("within 0.5 s" in got[f"vm{r}"][1] for r in range(5)), got


# ---- the unix socket ------------------------------------------------------------------------------


def test_peer_credentials_name_the_process_at_the_other_end():
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.geteuid(), os.getegid())


def test_the_unix_socket_serves_the_owner_without_tls(make):
    hosts = make(1, 1)
    with UnixClient(hosts.vms[0]["relay"], timeout=5) as c:
        assert c.call("ping") == {"pong": "vm0"}
    assert os.stat(hosts.vms[0]["relay"]).st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_peer_of_another_uid_is_refused_on_the_unix_socket(creds, tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    import shutil
    import tempfile

    # a directory anyone may enter (pytest's tmp_path is under a private one), so that only
    # the uid check stands in the way; removed at the end
    open_dir = tempfile.mkdtemp(prefix="pcocc-test-relay-")
    os.chmod(open_dir, 0o755)
    path = os.path.join(open_dir, "vm0.sock")
    cert, key = creds["server"]
    srv = ControlServer(FakeVM("vm0", creds), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER, unix_path=path)
    try:
        srv.start()
        os.chmod(path, 0o666)
        # the server may close before the request is sent (EPIPE) or read (a reset): either is a refusal
        probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
                 "try:\n    s.sendall(b'{\"op\": \"ping\", \"args\": {}}\\n'); got = s.recv(100)\n"
                 "except OSError:\n    got = b''\n"
                 "print('closed' if not got else repr(got))\n")
        r = subprocess.run([os.path.realpath(sys.executable), "-c", probe, path], user=nobody.pw_uid, group=nobody.pw_gid,
                           cwd="/", capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "closed", (r.stdout, r.stderr)
        assert srv.refused == 1
        with UnixClient(path, timeout=5) as c:  # the owner still gets through
            assert c.call("ping") == {"pong": "vm0"}
    finally:
        srv.stop(timeout=2, drain=0)
        gone = not os.path.exists(path)  # stop() removes its socket
        shutil.rmtree(open_dir, ignore_errors=True)
    assert gone


def test_an_unbindable_unix_path_leaves_tls_only(creds, tmp_path):
    cert, key = creds["server"]
    srv = ControlServer(FakeVM("vm0", creds), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER,
                        unix_path=str(tmp_path / ("x" * 120))).start()  # longer than sun_path
    try:
        assert srv.unix_path is None
        assert relay.plan([{"name": "vm0", "host": "h", "control": list(srv.address)}]) == [{"vm": "vm0", "address": list(srv.address)}]
    finally:
        srv.stop(timeout=2, drain=0)


# ---- the real VM handler (lifecycle.control) behind the relays ------------------------------------


def serve_vms(creds, tmp_path, make_handler, hosts=2, per=2):
    """hosts x per VMs, VM `rank` served by make_handler(rank, client_creds) behind a ControlServer
    (TLS on loopback, and a unix socket in its host's private directory); (servers, records as
    the store holds them). client_creds: the owner's, as the store's cluster_prefix + "client"."""
    cert, key = creds["server"]
    owner_cert, owner_key = creds["owner"]
    client_creds = {"ca": creds["ca"][0], "cert": owner_cert, "key": owner_key}
    servers, vms = [], []
    try:
        for h in range(hosts):
            hostdir = tmp_path / f"h{h}"
            hostdir.mkdir(mode=0o700)
            for i in range(per):
                rank = h * per + i
                srv = ControlServer(make_handler(rank, client_creds), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key,
                                    owner=OWNER, unix_path=str(hostdir / f"vm{rank}.sock")).start()
                servers.append(srv)
                vms.append({"name": f"vm{rank}", "state": "running", "host": f"h{h}", "control": list(srv.address), "relay": srv.unix_path})
    except BaseException:
        for s in servers:
            s.stop(timeout=2, drain=0)
        raise
    return servers, vms


@pytest.fixture
def real_vms(creds, tmp_path, monkeypatch):
    """2 hosts x 2 VMs served by the real ControlHandler (its relay op and credentials lookup)
    with test_exec_fake_agent's LocalAgent: the real runner, on this host."""
    from test_exec_fake_agent import LocalAgent

    from pcocc.agent import qga
    from pcocc.lifecycle.control import ControlHandler

    monkeypatch.setattr(qga, "EXEC_TMP", str(tmp_path))
    agents = []

    def handler(rank, client_creds):
        agents.append(LocalAgent())
        return ControlHandler(SimpleNamespace(config=SimpleNamespace(name=f"vm{rank}")), agents[-1], relay_credentials=lambda: client_creds)

    servers = []
    try:
        servers, vms = serve_vms(creds, tmp_path, handler)
        yield SimpleNamespace(vms=vms, ranks=list(range(4)), client=lambda rank, t: tls_client(creds, vms[rank]["control"], t),
                              connect=lambda address, t: tls_client(creds, address, t))
    finally:
        for s in servers:
            s.stop(timeout=2, drain=0.5)
        for a in agents:
            a.close()


def test_the_real_handler_relays_output_stdin_and_ctrl_c(real_vms, tmp_path, monkeypatch):
    import signal

    monkeypatch.setattr(relay, "WIDTH", 1)  # a chain: the client reaches h1 through h0's leader
    from test_exec_stream import Stream, processes_with

    assert relay.depth(relay.plan(real_vms.vms)) == 3  # client -> vm0 (h0) -> vm2 (h1) -> unix sockets

    def run(command, stdin=None, on_out=None):
        out, err = Stream(on_out), Stream()
        app = SimpleNamespace(env=SimpleNamespace(stdout=out, stderr=err))
        status = _ExecRun(app, real_vms, {"argv": ["/bin/sh", "-c", command], "user": None}, stdin, False).run()
        return status, out.bytes(), err.bytes()

    src = tmp_path / "in"
    src.write_bytes(b"x" * 300_000)
    with open(src, "rb") as f:
        status, out, err = run("wc -c; exit 3", stdin=f.fileno())
    assert status == 3
    assert sorted(out.splitlines()) == [f"vm{r}: 300000".encode() for r in range(4)]
    assert sorted(err.splitlines()) == [f"vm{r}: exited with status 3".encode() for r in range(4)]

    marker = f"{6000 + os.getpid() % 1000}.7"
    started = []

    def on_out(line):
        started.append(line)
        if len(started) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once every VM's command runs

    status, out, err = run(f"sleep {marker} & echo started; wait", on_out=on_out)
    assert status == 130, err
    assert processes_with(f"sleep\0{marker}") == []  # each VM confirmed the kill through the relays


@pytest.mark.parametrize("plan, timeout, says", [
    ({"links": [{"vm": "vm9", "unix": 5}]}, None, "unix must be a socket path"),
    ({"links": [{"vm": "vm9", "address": ["x"]}]}, None, "a VM link needs unix (a path) or address [host, port]"),
    ({"links": [{"relay": "vm9", "address": ["h", "port"], "plan": {"links": []}}]}, None, "a relay link needs"),
    ({"links": "all"}, None, "plan {links} expected"),
    ({"links": []}, "abc", "timeout must be a number of seconds"),
    ({"links": []}, -1, "timeout must be a number of seconds"),
])
def test_a_malformed_relay_request_is_refused_in_one_line(make, plan, timeout, says):
    """Only the owner may send one (TLS certificate, the unix socket's uid): still, a malformed
    plan or timeout is a usage error, not an internal error with a traceback in the VM's log."""
    from pcocc.errors import UsageError

    hosts = make(1, 1)
    with tls_client(hosts.creds, hosts.vms[0]["control"], 5) as c:
        with pytest.raises(UsageError, match="bad relay") as refused:
            stream = c.stream("relay", op="exec_stream", args={"argv": ["x"]}, plan=plan, timeout=timeout)
            while stream.receive(5.0)[0] != "result":
                pass
    assert says in refused.value.message and "\n" not in refused.value.message, refused.value.message
