"""pcocc display (the original's pcocc-display(1)) and the SPICE display of a VM
(pcocc.hypervisor.spice): the connection file, -p, the errors, the password kept private, and
the TCP relay to qemu's socket. No qemu here: tests/integration/test_display_spice.py runs
remote-viewer against real VMs."""

import configparser
import os
import socket
import stat
import threading

import pytest

from pcocc.cli import display as display_cli
from pcocc.errors import ExitStatus, PcoccError
from pcocc.hypervisor import spice, topology
from pcocc.hypervisor.qemu import VMConfig, command_line
from pcocc.listen import reverse_nat_ranges
from pcocc.templates import SETTINGS
from waiting import wait_for

PASSWORD = "Zm9vYmFyYmF6cXV1eDEyMzQ1"


def cluster(remote_display="spice", state="running", display=None, host=None, name="pcocc"):
    """(info, vms) as Backend.job gives them: vm0 of `spice`, vm1 of `plain` (no remote display)."""
    import socket as _socket

    host = host or _socket.gethostname().split(".")[0]
    shown = {"protocol": "spice", "host": "127.0.0.1", "port": 5931, "password": PASSWORD} if display is None else display
    info = {"jobid": 7, "name": name, "vms": [
        {"rank": 0, "template": "spicy", "settings": {"remote-display": remote_display}},
        {"rank": 1, "template": "plain", "settings": {"remote-display": None}}]}
    vms = [{"rank": 0, "name": "vm0", "state": state, "host": host, **({"display": shown} if shown else {})},
           {"rank": 1, "name": "vm1", "state": "running", "host": host}]
    return info, vms


@pytest.fixture
def fake_cluster(monkeypatch):
    """pcocc display reads this cluster instead of a store's: set the returned dict's "value"."""
    holder = {"value": cluster()}
    monkeypatch.setattr(display_cli, "_cluster", lambda app, jobid, jobname, owner=None: holder["value"])
    return holder


# ---- the connection file (remote-viewer(1), CONNECTION FILE)

def test_the_connection_file_is_remote_viewer_s():
    text = spice.connection_file(spice.display_record("10.0.0.5", 5931, PASSWORD), "vm0 - pcocc job 7\n(x)")
    assert text == ("[virt-viewer]\ntype=spice\nhost=10.0.0.5\nport=5931\npassword=" + PASSWORD + "\n"
                    "title=vm0 - pcocc job 7 (x)\ndelete-this-file=1\ntoggle-fullscreen=shift+f11\n"
                    "release-cursor=shift+f12\nsecure-attention=ctrl+alt+end\n")
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(text)
    assert parsed.sections() == ["virt-viewer"] and parsed["virt-viewer"]["password"] == PASSWORD


def test_p_prints_the_connection_file(cli, fake_cluster):
    r = cli("display", "-p")
    assert r.status == 0, r.stderr
    assert r.stdout == spice.connection_file(fake_cluster["value"][1][0]["display"], "vm0 - pcocc job 7 (pcocc)")
    assert cli("display", "--print_opts", "vm0").stdout == r.stdout  # the original's spelling
    assert cli("display", "--print-opts", "vm0").stdout == r.stdout


# ---- one-line errors, each with what to do

@pytest.mark.parametrize("case, argv, expected", [
    ("plain", ["vm1"], "vm1 has no remote display: add 'remote-display: spice' to its template 'plain' "
                       "(pcocc help templates.yaml) and start a new cluster"),
    ("plain", ["vm5"], "cluster 7 has no vm5 (it has 2 VMs)"),
    ("stopped", ["vm0"], "vm0 is not running (state: stopped)"),
    ("old", ["vm0"], "vm0 publishes no display (it was started by an older pcocc): start a new cluster"),
    ("newline", ["vm0"], "vm0: its record holds no valid display port or password"),
    ("badhost", ["vm0"], "vm0: its record holds no valid display address"),
    ("elsewhere", ["vm0"], "vm0 serves its display on node9's loopback address only: run 'pcocc display' on node9"),
])
def test_what_has_no_display_is_a_one_line_error(cli, fake_cluster, case, argv, expected):
    fake_cluster["value"] = {
        "plain": cluster(), "stopped": cluster(state="stopped"), "old": cluster(display={}),
        "newline": cluster(display={"protocol": "spice", "host": "127.0.0.1", "port": 5931, "password": PASSWORD + "\nx=1"}),
        "badhost": cluster(display={"protocol": "spice", "host": "h\nost", "port": 5931, "password": PASSWORD}),
        "elsewhere": cluster(host="node9"),
    }[case]
    r = cli("display", "-p", *argv)
    assert r.status == (ExitStatus.NOT_FOUND if case == "plain" and argv == ["vm5"] else ExitStatus.ERROR), r.stderr
    assert r.stderr == f"pcocc: error: {expected}\n" and r.stdout == ""


def test_a_vm_name_is_vmN(cli, fake_cluster):
    r = cli("display", "-p", "node1")
    assert r.status == ExitStatus.USAGE and r.stderr.startswith("pcocc: error: invalid VM name 'node1': write vmN")


# ---- launching remote-viewer: the password only in a private file, never on its command line

@pytest.fixture
def fake_viewer(tmp_path, cli):
    """A remote-viewer in PATH that records its argv, the mode of the file it is given and its text."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "viewer.txt"
    viewer = bindir / "remote-viewer"
    viewer.write_text(f"#!/bin/sh\n{{ echo \"$@\"; stat -c %a \"$1\"; cat \"$1\"; }} > {record}\nrm -f \"$1\"\nexit ${{VIEWER_STATUS:-0}}\n")
    viewer.chmod(0o755)
    cli.environ.update(PATH=f"{bindir}:{cli.environ['PATH']}", DISPLAY=":99", PCOCC_RUN_DIR=str(tmp_path / "run"))
    return record


def test_remote_viewer_gets_a_private_file(cli, fake_cluster, fake_viewer, tmp_path):
    r = cli("display", "vm0")
    assert r.status == 0, r.stderr
    argv, mode, *text = fake_viewer.read_text().splitlines()
    assert PASSWORD not in argv and argv.startswith(str(tmp_path / "run")) and argv.endswith(".vv")
    assert mode == "600" and f"password={PASSWORD}" in text and "delete-this-file=1" in text
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".vv")]


def test_the_file_goes_even_when_remote_viewer_fails(cli, fake_cluster, fake_viewer, tmp_path):
    fake_viewer.parent.joinpath("bin", "remote-viewer").write_text("#!/bin/sh\nexit 3\n")
    r = cli("display", "vm0")
    assert r.status == 3
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".vv")]


def test_no_viewer_or_no_x_display_says_what_to_do(cli, fake_cluster, fake_viewer, tmp_path):
    del cli.environ["DISPLAY"]
    r = cli("display", "vm0")
    assert r.status == ExitStatus.ERROR and r.stderr == (
        "pcocc: error: no graphical display here ($DISPLAY is not set): use ssh -X, or 'pcocc display -p vm0' "
        "and run remote-viewer on the file where you have one\n")
    cli.environ.update(DISPLAY=":99", PATH=str(tmp_path / "empty"))
    r = cli("display", "vm0")
    assert r.stderr == ("pcocc: error: remote-viewer: command not found (install virt-viewer), or print its "
                        "connection file with 'pcocc display -p vm0'\n")


def test_help_names_the_options(cli):
    r = cli("display", "--help")
    assert r.status == 0 and "-p, --print_opts" in r.stdout and "remote-display: spice" in r.stdout
    assert "-j, --jobid" in r.stdout and "--user" in r.stdout


# ---- qemu's side: the password in a 0600 file, read by a secret object

def test_the_password_is_random_and_private(tmp_path):
    a = spice.write_password(str(tmp_path))
    path = tmp_path / spice.PASSWORD_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == a
    assert display_cli._PASSWORD.fullmatch(a) and len(a) <= 60
    other = tmp_path / "other"
    other.mkdir()
    assert spice.write_password(str(other)) != a
    with pytest.raises(FileExistsError):  # never over a file or link another put there
        spice.write_password(str(tmp_path))
    third = tmp_path / "third"
    third.mkdir()
    (third / spice.PASSWORD_FILE).symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        spice.write_password(str(third))
    assert not (tmp_path / "target").exists()


def test_qemu_reads_the_password_from_its_file(tmp_path):
    values = {k: s.default for k, s in SETTINGS.items()} | {"remote-display": "spice"}
    vm = VMConfig(name="vm0", rundir=str(tmp_path), settings=values, accel="tcg",
                  topology=topology.plan((0,), 256, sysfs=str(tmp_path / "nosys")))
    password = spice.write_password(str(tmp_path))
    argv = command_line(vm)
    assert not any(password in a for a in argv)
    objects = [argv[i + 1] for i, a in enumerate(argv) if a == "-object"]
    assert f"secret,id=spice-password,format=raw,file={tmp_path}/spice.pw" in objects
    (spice_arg,) = [argv[i + 1] for i, a in enumerate(argv) if a == "-spice"]
    assert spice_arg == f"unix=on,addr={tmp_path}/spice.sock,password-secret=spice-password"
    assert "disable-ticketing" not in " ".join(argv) and argv[argv.index("-vga") + 1] == "qxl"


# ---- the relay: a port the kernel picks, each connection passed to qemu's socket

@pytest.fixture
def echo_server(tmp_path):
    """A unix socket that echoes each connection (SPICE's place), until the test ends."""
    path = str(tmp_path / "echo.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    done = threading.Event()

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield path
    done.set()
    server.close()


def _exchange(port, payload):
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        received = bytearray()

        def read():
            while len(received) < len(payload) and (data := c.recv(65536)):
                received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        c.sendall(payload)
        reader.join(120)
        return bytes(received)


def test_the_relay_passes_connections_both_ways(echo_server):
    a = spice.Relay("127.0.0.1", echo_server).start()
    b = spice.Relay("127.0.0.1", echo_server).start()
    try:
        assert a.port != b.port and a.port > 0
        big = os.urandom(4 << 20)  # more than the relay holds per direction: reading pauses, nothing is lost
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _exchange(a.port, big[i:] + b"end")))
                   for i in range(3)]  # several channels at once, as a SPICE client opens
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(results[i] == big[i:] + b"end" for i in range(3))
        assert _exchange(b.port, b"hello") == b"hello"
    finally:
        a.stop()
        b.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", a.port)) != 0
    a.stop()  # idempotent


def test_a_connection_ends_with_its_peer(tmp_path):
    path = str(tmp_path / "closing.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    relay = spice.Relay("127.0.0.1", path).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=60) as c:
            inner, _ = server.accept()
            inner.sendall(b"bye")
            inner.close()  # qemu closes the channel: the client sees its end after the data
            data = b""
            while chunk := c.recv(100):
                data += chunk
            assert data == b"bye"
    finally:
        relay.stop()
        server.close()


def test_the_relay_cannot_listen_is_one_line(tmp_path):
    with pytest.raises(PcoccError, match=r"^cannot listen for the remote display on 192\.0\.2\.1: "):
        spice.Relay("192.0.2.1", str(tmp_path / "x.sock"))


def test_a_client_waits_for_no_dead_socket(tmp_path):
    relay = spice.Relay("127.0.0.1", str(tmp_path / "none.sock")).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=60) as c:
            assert c.recv(10) == b""  # qemu's socket is gone: the connection is closed, not held
        assert wait_for(lambda: relay._thread.is_alive(), timeout=10)
    finally:
        relay.stop()


def test_the_relay_s_port_is_outside_the_reverse_nat_ports(tmp_path):
    """A reverse-NAT DNAT rule catches its port on every local address: the relay takes none of them."""
    from types import SimpleNamespace

    from pcocc.config.models import Network

    config = SimpleNamespace(networks={
        "l3": Network("l3", "ethernet", {"reverse-nat": {"vm-port": 22, "min-host-port": 40000, "max-host-port": 50000}}),
        "l2": Network("l2", "ethernet", {"reverse-nat": None}), "ib": Network("ib", "infiniband", {})})
    assert reverse_nat_ranges(config) == [(40000, 50000)]
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    half = (low, (low + high) // 2)  # the kernel's picks fall there half of the time
    relays = [spice.Relay("127.0.0.1", str(tmp_path / "x.sock"), avoid=[half]) for _ in range(8)]
    try:
        assert not [r.port for r in relays if half[0] <= r.port <= half[1]]
    finally:
        for r in relays:
            r.stop()
    with pytest.raises(PcoccError, match=r"the kernel gave 64 ports within the reverse-NAT ranges of networks.yaml"):
        spice.Relay("127.0.0.1", str(tmp_path / "x.sock"), avoid=[(1, 65535)])


def test_another_local_user_gets_no_relay_slot_and_a_flood_cannot_kill_the_relay(echo_server, monkeypatch):
    """Review finding: idle connections of another user exhausted the VM process's descriptors and
    the relay died for good. Local peers of another uid are reset at once (as by the control
    endpoint); remote ones beyond MAX_PAIRS evict the oldest; the relay goes on relaying."""
    from pcocc.agent import endpoint

    relay = spice.Relay("127.0.0.1", echo_server).start()
    try:
        monkeypatch.setattr(endpoint, "local_peer_uid", lambda sock: os.geteuid() + 1)  # as if another user
        try:
            # On loopback the relay's reset can land before connect() returns: that refusal counts too.
            with socket.create_connection(("127.0.0.1", relay.port), timeout=60) as c:
                c.sendall(b"must not be relayed")
                assert c.recv(10) == b""  # reset or closed: never relayed
        except (ConnectionResetError, BrokenPipeError):
            pass
        monkeypatch.setattr(endpoint, "local_peer_uid", lambda sock: None)  # remote peers
        monkeypatch.setattr(spice, "MAX_PAIRS", 4)
        held = [socket.create_connection(("127.0.0.1", relay.port), timeout=60) for _ in range(10)]
        try:
            assert _exchange(relay.port, b"still relayed") == b"still relayed"
            first = held[0]
            first.settimeout(60)
            try:
                assert first.recv(10) == b""  # the oldest was evicted
            except ConnectionResetError:
                pass
        finally:
            for s in held:
                s.close()
    finally:
        relay.stop()
