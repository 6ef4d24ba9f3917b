"""The control endpoint of a VM: mutual TLS, owner check, JSON lines protocol, fan-out."""

import json
import os
import socket
import ssl
import threading
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pcocc.agent import pki
from pcocc.agent.endpoint import AgentError, ControlClient, ControlServer, decode_bytes, encode_bytes
from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, TimeoutExpired

OWNER = "alice"


class FakeHandler:
    """A VM that runs a few fake commands."""

    def __init__(self):
        self.calls = []

    def op_ping(self):
        self.calls.append("ping")
        return {"pong": True, "thread": threading.current_thread().name}

    def op_exec(self, argv, input_b64=""):
        self.calls.append("exec")
        data = decode_bytes(input_b64)
        if argv[0] == "cat":
            return {"exit_code": 0, "stdout_b64": encode_bytes(data), "stderr_b64": ""}
        if argv[0] == "exit":
            return {"exit_code": int(argv[1]), "stdout_b64": "", "stderr_b64": encode_bytes(b"bye\xff\n")}
        raise NotFoundError(f"{argv[0]}: command not found")

    def op_slow(self, seconds):
        time.sleep(seconds)
        return {"slept": seconds}

    def op_crash(self):
        return 1 / 0

    def op_raise(self, kind):
        raise {"permission": PermissionDenied, "timeout": TimeoutExpired, "error": PcoccError}[kind](f"raised {kind}", "a hint")

    def op_unjsonable(self):
        return {"data": b"raw bytes"}


@pytest.fixture(scope="module")
def creds():
    ca = pki.make_ca("cluster-1")
    other_ca = pki.make_ca("cluster-2")
    return {
        "ca": ca,
        "server": pki.issue(*ca, "vm0", server=True, ips=("127.0.0.1",)),
        "owner": pki.issue(*ca, OWNER),
        "stranger": pki.issue(*ca, "bob"),
        "forged": pki.issue(*other_ca, OWNER),  # right name, wrong cluster
        "other_ca": other_ca,
    }


def start_server(creds, handler=None):
    cert, key = creds["server"]
    return ControlServer(handler or FakeHandler(), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER).start()


def client(creds, address, who="owner", ca=None, timeout=5.0):
    cert, key = creds[who]
    return ControlClient(address, ca_pem=(ca or creds["ca"])[0], cert_pem=cert, key_pem=key, timeout=timeout)


@pytest.fixture
def server(creds):
    before = set(threading.enumerate())
    srv = start_server(creds)
    yield srv
    srv.stop()
    assert set(threading.enumerate()) <= before, "threads left behind"


def test_certificates(creds):
    ca_cert = x509.load_pem_x509_certificate(creds["ca"][0])
    srv = x509.load_pem_x509_certificate(creds["server"][0])
    usr = x509.load_pem_x509_certificate(creds["owner"][0])
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert srv.issuer == usr.issuer == ca_cert.subject
    assert usr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == OWNER
    assert [str(ip) for ip in srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(usr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert b"ENCRYPTED" not in creds["owner"][1]
    days = (usr.not_valid_after_utc - usr.not_valid_before_utc).days
    assert 365 <= days <= 367  # longer than any job: certificates must not expire while a cluster runs


def test_issuing_is_fast(creds):
    n = 20
    t0 = time.perf_counter()
    for i in range(n):
        pki.issue(*creds["ca"], f"vm{i}", server=True, ips=("127.0.0.1",), dns=(f"vm{i}",))
    assert (time.perf_counter() - t0) / n < 0.05  # ~0.4 ms here; generous for a loaded machine


def test_good_client_gets_results(creds, server):
    with client(creds, server.address) as c:
        assert c.call("ping")["pong"] is True
        r = c.call("exec", argv=["exit", "3"])
        assert r["exit_code"] == 3 and decode_bytes(r["stderr_b64"]) == b"bye\xff\n"
        assert c.call("exec", argv=["exit", "0"])["exit_code"] == 0


def test_exec_output_round_trips_arbitrary_bytes(creds, server):
    data = bytes(range(256)) + b"\n\r\x00" + os.urandom(1 << 20)
    with client(creds, server.address) as c:
        r = c.call("exec", argv=["cat"], input_b64=encode_bytes(data))
    assert decode_bytes(r["stdout_b64"]) == data


def test_several_requests_over_one_connection(creds, server):
    with client(creds, server.address) as c:
        threads = {c.call("ping")["thread"] for _ in range(50)}
    assert len(threads) == 1  # one connection thread served them all
    assert server.handler.calls == ["ping"] * 50


def test_another_user_of_the_cluster_is_refused(creds, server):
    with client(creds, server.address, who="stranger") as c:
        with pytest.raises(PermissionDenied, match=f"permission denied: this VM belongs to {OWNER}"):
            c.call("ping")
        with pytest.raises(PermissionDenied):  # and again on the same connection
            c.call("exec", argv=["cat"])
    assert server.handler.calls == []


def test_certificate_from_another_cluster_fails_the_handshake(creds, server):
    with client(creds, server.address, who="forged") as c:
        with pytest.raises(AgentError, match=r"TLS failure .* 127\.0\.0\.1:\d+"):
            c.call("ping")
    assert server.handler.calls == []
    with client(creds, server.address) as c:  # the server is unharmed
        assert c.call("ping")["pong"]


def test_server_from_another_cluster_is_not_trusted(creds, server):
    with client(creds, server.address, ca=creds["other_ca"]) as c:
        with pytest.raises(AgentError, match="TLS failure .* certificate"):
            c.call("ping")
    assert server.handler.calls == []


def test_client_without_certificate_fails(creds, server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=creds["ca"][0].decode())
    with socket.create_connection(server.address, timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as s:
                s.sendall(json.dumps({"op": "ping", "args": {}}).encode() + b"\n")
                # with TLS 1.3 the refusal arrives here, as an alert or an end of file
                if not s.recv(4096):
                    raise ConnectionError("closed")
    assert server.handler.calls == []


def test_unknown_op_and_bad_arguments_are_errors(creds, server):
    with client(creds, server.address) as c:
        with pytest.raises(AgentError, match="unknown operation 'nope'"):
            c.call("nope")
        with pytest.raises(AgentError, match="invalid op"):
            c.call("../ping")
        with pytest.raises(AgentError, match="bad arguments for 'exec'"):
            c.call("exec", argv=["cat"], color="red")
        assert c.call("ping")["pong"]


@pytest.mark.parametrize("kind, cls", [("permission", PermissionDenied), ("timeout", TimeoutExpired), ("error", PcoccError)])
def test_handler_errors_keep_their_kind(creds, server, kind, cls):
    with client(creds, server.address) as c:
        with pytest.raises(cls, match=f"^raised {kind}$") as info:
            c.call("raise", kind=kind)
        assert info.value.hint == "a hint"
        with pytest.raises(NotFoundError, match="frobnicate: command not found"):
            c.call("exec", argv=["frobnicate"])


def test_handler_exception_does_not_kill_the_server(creds, server):
    with client(creds, server.address) as c:
        with pytest.raises(AgentError, match="internal error: ZeroDivisionError"):
            c.call("crash")
        with pytest.raises(AgentError, match="internal error: result is not JSON"):
            c.call("unjsonable")
        assert c.call("ping")["pong"]  # same connection
    with client(creds, server.address) as c:
        assert c.call("ping")["pong"]  # new connection


def test_client_timeout_then_recovers(creds, server):
    with client(creds, server.address, timeout=0.2) as c:
        with pytest.raises(TimeoutExpired, match="within 0.2 s"):
            c.call("slow", seconds=0.5)
        assert c.call("ping")["pong"]  # reconnected; the late answer is not mistaken for this one


def test_connection_refused_names_the_address(creds):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with client(creds, ("127.0.0.1", port)) as c:
        with pytest.raises(AgentError, match=f"cannot reach the control endpoint at 127.0.0.1:{port}"):
            c.call("ping")


def test_stop_is_prompt_and_leaves_no_thread(creds):
    before = set(threading.enumerate())
    srv = start_server(creds)
    clients = [client(creds, srv.address) for _ in range(3)]
    for c in clients:
        c.call("ping")  # idle, authenticated connections
    silent = socket.create_connection(srv.address)  # never says hello
    busy, outcome = client(creds, srv.address), []

    def slow_call():
        try:
            outcome.append(busy.call("slow", seconds=0.3))
        except PcoccError as e:
            outcome.append(e)

    slow = threading.Thread(target=slow_call)
    slow.start()
    time.sleep(0.1)  # let the slow request reach the handler
    t0 = time.monotonic()
    srv.stop(drain=0)
    assert time.monotonic() - t0 < 2.0
    slow.join(5)
    assert isinstance(outcome[0], AgentError)  # not drained: its connection was cut under it
    assert set(threading.enumerate()) <= before
    with pytest.raises(AgentError):
        clients[0].call("ping")
    with pytest.raises(AgentError, match="cannot reach"):
        client(creds, srv.address).call("ping")
    srv.stop()  # twice is fine
    for c in clients + [busy]:
        c.close()
    silent.close()


def test_stop_lets_a_request_being_served_answer(creds):
    """e.g. a checkpoint's stop: the VM's qemu is gone when its answer goes out."""
    srv = start_server(creds)
    busy, outcome = client(creds, srv.address), []
    slow = threading.Thread(target=lambda: outcome.append(busy.call("slow", seconds=0.3)))
    slow.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 2.0
    slow.join(5)
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception)
    with pytest.raises(AgentError, match="cannot reach"):  # and no new request is taken
        client(creds, srv.address).call("ping")
    busy.close()


# ---- a stranger must not lock the owner out; a request learns that its client left -------------

# The system's python, not the venv's: another user may not be able to enter the checkout
# (cloned under /root, say); the scripts run as him need nothing but the standard library.
BASE_PYTHON = os.path.realpath(__import__("sys").executable)

FLOOD = r"""
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel, held, opened = selectors.DefaultSelector(), set(), 0
def fill():
    global opened
    for _ in range(n - len(held)):
        opened += 1
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:  # reset by the server before connect() returned
            continue
        held.add(s)
        sel.register(s, selectors.EVENT_READ)
fill()
print(opened, flush=True)                      # the first wave is in
sel.register(sys.stdin, selectors.EVENT_READ)
while True:                                    # reopen what the server drops, until stdin closes
    for key, _ in sel.select(0.2):
        if key.fileobj is sys.stdin:
            print(opened, flush=True)
            sys.exit(0)
        try:
            data = key.fileobj.recv(1)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
            held.discard(key.fileobj)
    fill()
"""


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the flood as another user (CI runs as root)")
def test_another_local_user_flooding_the_endpoint_cannot_lock_the_owner_out(creds):
    import pwd
    import subprocess
    import sys

    nobody = pwd.getpwnam("nobody")
    srv = start_server(creds)
    fds = _open_fds()
    flood = subprocess.Popen([BASE_PYTHON, "-c", FLOOD, str(srv.address[1]), "600"], user=nobody.pw_uid, group=nobody.pw_gid,
                             extra_groups=[], cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert int(flood.stdout.readline()) == 600  # the first wave of connections
        for _ in range(5):
            with client(creds, srv.address) as c:
                assert c.call("ping")["pong"] is True
        assert srv.refused >= 600
        assert _open_fds() < fds + 20  # the stranger's connections hold no descriptor of the VM's process
        assert len(srv._conns) <= 1  # the owner's last connection, perhaps still closing: none of the stranger's
    finally:
        flood.stdin.close()
        reopened = int(flood.stdout.readline())
        flood.wait(10)
        srv.stop()
    assert reopened > 600  # it kept trying: its connections were cut, not left idle


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket of another user")
def test_local_peer_uid_names_the_user_of_the_other_end():
    import pwd
    import subprocess
    import sys

    from pcocc.agent.endpoint import local_peer_uid

    nobody = pwd.getpwnam("nobody").pw_uid
    with socket.create_server(("127.0.0.1", 0)) as listener:
        mine = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        assert local_peer_uid(conn) == os.geteuid()
        mine.close()
        conn.close()
        hold = "import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); sys.stdin.read()"
        p = subprocess.Popen([BASE_PYTHON, "-c", hold, str(listener.getsockname()[1])], user=nobody, cwd="/", stdin=subprocess.PIPE)
        try:
            conn, _ = listener.accept()
            assert local_peer_uid(conn) == nobody
        finally:
            p.stdin.close()
            p.wait(10)
        p.wait()
        assert local_peer_uid(conn) == -1  # its end is closed: never taken for one of ours
        conn.close()


def test_proc_net_tcp_fallback_agrees_with_sock_diag():
    from pcocc.agent import endpoint

    with socket.create_server(("127.0.0.1", 0)) as listener:
        mine = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        ours, peer = conn.getsockname(), conn.getpeername()
        family, ours_ip, peer_ip = endpoint._family_and_ips(ours[0], peer[0])
        assert endpoint._proc_net_tcp_uid(family, peer_ip, peer[1], ours_ip, ours[1]) == os.geteuid()
        assert endpoint._proc_net_tcp_uid(family, peer_ip, 1, ours_ip, ours[1]) is None  # not here: remote
        mine.close()
        conn.close()


def test_remote_peers_that_never_authenticate_are_evicted_oldest_first(creds, monkeypatch):
    from pcocc.agent import endpoint

    monkeypatch.setattr(endpoint, "local_peer_uid", lambda sock: None)  # as if every peer were on another node
    cert, key = creds["server"]
    srv = ControlServer(FakeHandler(), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER, max_pending=8).start()
    idle = [socket.create_connection(srv.address) for _ in range(40)]
    try:
        with client(creds, srv.address) as c:
            assert c.call("ping")["pong"] is True
        assert srv.evicted >= 40 - 8
        assert len(srv._pending) <= 8
        assert idle[0].recv(1) == b""  # the oldest were cut
    finally:
        for s in idle:
            s.close()
        srv.stop()


class SessionHandler:
    def __init__(self):
        self.noticed = threading.Event()

    def op_watch(self, session):
        return {"present": session.present()}

    def op_until_gone(self, session):
        for _ in range(1000):
            if not session.present():
                self.noticed.set()
                return {}
            time.sleep(0.01)
        return {"gave_up": True}


def test_a_request_learns_that_its_client_left(creds):
    handler = SessionHandler()
    cert, key = creds["server"]
    srv = ControlServer(handler, ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER).start()
    try:
        c = client(creds, srv.address)
        assert c.call("watch") == {"present": True}
        c.close()
        with client(creds, srv.address, timeout=0.2) as c:
            with pytest.raises(TimeoutExpired):
                c.call("until_gone")  # the client gives up and closes its connection
        assert handler.noticed.wait(10)
        with client(creds, srv.address) as c:
            with pytest.raises(AgentError, match="'session' is given by the server"):
                c.call("watch", session=1)
    finally:
        srv.stop()


def test_a_usage_error_on_the_vm_side_is_a_usage_error_for_the_client():
    """e.g. `save -i 3` of a VM with one drive: status 2 (bad command line), not 8."""
    from pcocc.agent.endpoint import _KIND_ERRORS, _error_response
    from pcocc.errors import UsageError

    response = _error_response(UsageError("vm0 has no persistent drive 3"))
    assert response["kind"] == "usage"
    assert _KIND_ERRORS[response["kind"]] is UsageError


def test_the_endpoint_s_port_is_never_one_the_reverse_nat_takes(creds):
    """The node's reverse-NAT DNAT rules take their ports on every local address (pcocc.listen):
    an endpoint there would never be reached. Half of the kernel's ephemeral range is avoided."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    half = (low, (low + high) // 2)
    cert, key = creds["server"]
    servers = [ControlServer(FakeHandler(), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER, avoid=[half]).start()
               for _ in range(8)]
    try:
        assert not [s.address[1] for s in servers if half[0] <= s.address[1] <= half[1]]
        with client(creds, servers[0].address) as c:
            assert c.call("ping")["pong"] is True
    finally:
        for s in servers:
            s.stop()


def test_the_console_ops_reach_a_vm_s_console_from_another_host(creds, tmp_path):
    """console and console -l from another host than the VM's (the original's): the VM's console
    socket and log, through its endpoint. Here a unix socket server that echoes stands for qemu's."""
    import base64
    from types import SimpleNamespace

    from pcocc.lifecycle.control import ControlHandler

    sock_path = tmp_path / "console.sock"
    (tmp_path / "console.log").write_bytes(b"boot\nPCOCC-READY vm0\n")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen(1)

    def echo():
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    vm = SimpleNamespace(config=SimpleNamespace(name="vm0", path=lambda name: str(tmp_path / name)))
    srv = start_server(creds, ControlHandler(vm, agent=None, rev=None, images=None, drives=[]))
    try:
        with client(creds, srv.address) as c:
            log = c.call("console_log")
            assert base64.b64decode(log["data_b64"]) == b"boot\nPCOCC-READY vm0\n" and log["cut"] == 0
        with client(creds, srv.address) as c:
            stream = c.stream("console")
            assert stream.first == {"attached": True}
            stream.send({"in_b64": base64.b64encode(b"echo hi\r").decode()})
            got = b""
            while b"ECHO HI\r" not in got:
                kind, value = stream.receive(None)
                assert kind == "event", (kind, value)
                got += base64.b64decode(value["out_b64"])
        with client(creds, srv.address, who="stranger") as c:  # another user is refused, as for every op
            with pytest.raises(PermissionDenied):
                c.call("console_log")
    finally:
        srv.stop()
        listener.close()
