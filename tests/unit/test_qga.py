"""The guest agent client against a fake qemu-ga on a unix socket (no qemu needed)."""

import base64
import json
import os
import socket
import threading
import time

import pytest

from pcocc.agent.qga import CHUNK, AgentCommandError, AgentError, AgentTimeout, GuestAgent
from pcocc.errors import ExitStatus, PcoccError, TimeoutExpired


class FakeAgent:
    """A fake qemu-ga: JSON lines in and out, 0xFF resets its parser, guest-sync-delimited
    replies start with 0xFF.  Knobs reproduce what a real channel does to clients:

    start_delay: seconds before it reads anything (a guest still booting: qemu keeps
        what the client writes, and the agent answers all of it once it starts);
    greeting: bytes sent at each connection (stale replies of a previous client);
    delays: {command: seconds} before replying;
    drop_after: close the connection after that many commands.
    """

    def __init__(self, path, start_delay=0.0, greeting=b"", delays=None, drop_after=None):
        self.path = str(path)
        self.start_delay = start_delay
        self.greeting = greeting
        self.delays = delays or {}
        self.drop_after = drop_after
        self.requests = []  # every command received, with its arguments
        self.files = {}
        self.handles = {}
        self.procs = {}
        self.frozen = False
        self.connections = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping = True
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self.server.close()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def commands(self, name=None):
        return [r for r in self.requests if name is None or r["execute"] == name]

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self._session(conn)

    def _session(self, conn):
        if self.start_delay:
            time.sleep(self.start_delay)
            self.start_delay = 0
        if self.greeting:
            conn.sendall(self.greeting)
        buf, handled = b"", 0
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.rsplit(b"\xff", 1)[-1].strip()
                if not line:
                    continue
                request = json.loads(line)
                self.requests.append(request)
                reply = self._handle(request)
                time.sleep(self.delays.get(request["execute"], 0))
                if reply is not None:
                    conn.sendall(reply)
                handled += 1
                if self.drop_after is not None and handled >= self.drop_after:
                    self.drop_after = None
                    return

    def _handle(self, request):
        cmd, args = request["execute"], request.get("arguments", {})

        def ok(value):
            return json.dumps({"return": value}).encode() + b"\n"

        def error(desc):
            return json.dumps({"error": {"class": "GenericError", "desc": desc}}).encode() + b"\n"

        if cmd == "guest-sync-delimited":
            return b"\xff" + ok(args["id"])
        if cmd == "guest-ping":
            return ok({})
        if cmd == "guest-shutdown":
            return None  # no reply on success
        if cmd == "guest-exec":
            pid = 1000 + len(self.procs)
            self.procs[pid] = {"args": args, "polls": 0}
            return ok({"pid": pid})
        if cmd == "guest-exec-status":
            proc = self.procs.get(args["pid"])
            if proc is None:
                return error("Invalid parameter 'pid'")
            proc["polls"] += 1
            argv = [proc["args"]["path"], *proc["args"].get("arg", [])]
            if argv[0] == "sleep" or proc["polls"] < 3:
                return ok({"exited": False})
            if argv[0] == "selfkill":
                return ok({"exited": True, "signal": 9})
            stdin = base64.b64decode(proc["args"].get("input-data", ""))
            out = json.dumps({"argv": argv, "env": proc["args"].get("env"), "stdin": stdin.decode()}).encode()
            code = int(argv[1]) if argv[0] == "exit" else 0
            return ok({"exited": True, "exitcode": code, "out-data": base64.b64encode(out).decode(), "err-data": base64.b64encode(b"warn\n").decode()})
        if cmd == "guest-file-open":
            if "r" in args["mode"] and args["path"] not in self.files:
                return error(f"failed to open file '{args['path']}': No such file or directory")
            if "w" in args["mode"]:
                self.files[args["path"]] = b""
            handle = 7 + len(self.handles)
            self.handles[handle] = [args["path"], 0]
            return ok(handle)
        if cmd == "guest-file-write":
            path, _ = self.handles[args["handle"]]
            data = base64.b64decode(args["buf-b64"])
            self.files[path] += data
            return ok({"count": len(data), "eof": False})
        if cmd == "guest-file-read":
            entry = self.handles[args["handle"]]
            data = self.files[entry[0]][entry[1] : entry[1] + args["count"]]
            entry[1] += len(data)
            eof = entry[1] >= len(self.files[entry[0]])
            return ok({"count": len(data), "buf-b64": base64.b64encode(data).decode(), "eof": eof})
        if cmd == "guest-file-close":
            self.handles.pop(args["handle"])
            return ok({})
        if cmd == "guest-fsfreeze-freeze":
            self.frozen = True
            return ok(2)
        if cmd == "guest-fsfreeze-thaw":
            self.frozen = False
            return ok(2)
        if cmd == "guest-fsfreeze-status":
            return ok("frozen" if self.frozen else "thawed")
        if cmd == "slow":
            return ok("late")
        return error(f"The command {cmd} has not been found")


@pytest.fixture
def sock(tmp_path):
    # unix socket paths are limited to 108 bytes: keep it short
    path = f"/tmp/qga-test-{os.getpid()}-{threading.get_ident()}.sock"
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def fake(sock):
    agents = []

    def make(**knobs):
        agents.append(FakeAgent(sock, **knobs))
        return agents[-1]

    yield make
    for agent in agents:
        agent.stop()


def test_connect_waits_for_the_socket(sock, fake):
    timer = threading.Timer(0.3, fake)
    timer.start()
    with GuestAgent(sock, timeout=2) as agent:
        agent.connect(timeout=5)
        agent.ping()
    timer.join()


def test_connect_gives_up_at_the_deadline(sock):
    agent = GuestAgent(sock, timeout=1)
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as err:
        agent.connect(deadline=time.monotonic() + 0.3)
    assert time.monotonic() - started < 2
    assert isinstance(err.value, PcoccError) and isinstance(err.value, TimeoutExpired) and isinstance(err.value, AgentError)
    assert err.value.status == ExitStatus.TIMEOUT
    assert sock in err.value.message


def test_stale_replies_and_partial_lines_are_dropped(sock, fake):
    server = fake(greeting=b'{"return": {"pid": 5}}\n{"return": 12345}\n{"retu')
    with GuestAgent(sock, timeout=2) as agent:
        agent.ping()  # connects implicitly
        assert agent.fsfreeze_status() == "thawed"
    assert [r["execute"] for r in server.requests] == ["guest-sync-delimited", "guest-ping", "guest-fsfreeze-status"]


def test_a_late_agent_answers_every_sync_and_only_the_last_counts(sock, fake):
    server = fake(start_delay=1.6)
    with GuestAgent(sock, timeout=2) as agent:
        agent.connect(timeout=10)
        assert agent.fsfreeze_status() == "thawed"
    assert len(server.commands("guest-sync-delimited")) >= 2
    ids = [r["arguments"]["id"] for r in server.commands("guest-sync-delimited")]
    assert len(set(ids)) == len(ids)


def test_exec_returns_code_and_output(sock, fake):
    server = fake()
    with GuestAgent(sock, timeout=2) as agent:
        code, out, err = agent.exec(["exit", "3"], input="in put", env={"A": "1"})
    assert code == 3
    assert json.loads(out) == {"argv": ["exit", "3"], "env": ["A=1"], "stdin": "in put"}
    assert err == b"warn\n"
    assert server.commands("guest-exec")[0]["arguments"]["capture-output"] is True
    assert len(server.commands("guest-exec-status")) == 3


def test_exec_of_a_killed_process_gives_minus_the_signal(sock, fake):
    fake()
    with GuestAgent(sock, timeout=2) as agent:
        assert agent.exec(["selfkill"])[0] == -9


def test_exec_timeout_kills_the_process(sock, fake):
    server = fake()
    with GuestAgent(sock, timeout=2) as agent:
        with pytest.raises(AgentTimeout):
            agent.exec(["sleep", "100"], timeout=0.3)
    kill = server.commands("guest-exec")[-1]["arguments"]
    assert kill["path"] == "kill" and kill["arg"] == ["-KILL", "1000"]


def test_error_reply_raises_agent_command_error(sock, fake):
    fake()
    with GuestAgent(sock, timeout=2) as agent:
        with pytest.raises(AgentCommandError) as err:
            agent.execute("guest-no-such-command")
        assert err.value.error_class == "GenericError"
        assert "has not been found" in err.value.desc
        agent.ping()  # the connection is still in sync


def test_several_commands_in_one_round_trip_answer_in_order_with_their_errors(sock, fake):
    server = fake()
    with GuestAgent(sock, timeout=2) as agent:
        ping, missing, handle, status = agent.execute_many([
            ("guest-ping", None), ("guest-no-such-command", None),
            ("guest-file-open", {"path": "f", "mode": "w"}), ("guest-fsfreeze-status", None)])
        assert (ping, handle, status) == ({}, 7, "thawed")
        assert isinstance(missing, AgentCommandError) and "has not been found" in missing.desc
        assert [r["execute"] for r in server.requests[-4:]] == ["guest-ping", "guest-no-such-command", "guest-file-open",
                                                                "guest-fsfreeze-status"]
        agent.ping()  # still in sync
        assert agent.execute_many([]) == []


def test_the_handle_epoch_changes_when_handle_numbers_go_back(sock, fake):
    """qemu-ga numbers handles from a counter (from 1000 in a new state file): a number not
    above every one seen means its counter started again (a rebooted guest), and handles
    kept from before may name other files now (agent.qga.SpareRunner)."""
    fake()  # numbers its handles 7 + how many are open
    with GuestAgent(sock, timeout=2) as agent:
        a = agent.execute("guest-file-open", {"path": "a", "mode": "w"})
        b = agent.execute_many([("guest-file-open", {"path": "b", "mode": "w"})])[0]
        assert (a, b, agent.handle_epoch) == (7, 8, 0)
        agent.execute("guest-file-close", {"handle": b})
        assert agent.execute("guest-file-open", {"path": "c", "mode": "w"}) == 8
        assert agent.handle_epoch == 1
        assert agent.execute("guest-file-open", {"path": "d", "mode": "w"}) == 9
        assert agent.handle_epoch == 1


def test_a_reply_that_comes_too_late_is_dropped_by_the_next_resync(sock, fake):
    server = fake(delays={"slow": 0.8})
    with GuestAgent(sock, timeout=3) as agent:
        with pytest.raises(AgentTimeout):
            agent.execute("slow", timeout=0.2)
        # the late {"return": "late"} must not be taken as the reply to this one
        assert agent.fsfreeze_status() == "thawed"
    assert len(server.commands("guest-sync-delimited")) >= 2


def test_file_round_trip_in_chunks(sock, fake):
    server = fake()
    data = os.urandom(CHUNK * 2 + 123)
    with GuestAgent(sock, timeout=5) as agent:
        agent.write_file("/etc/blob", data, mode=0o600)
        assert agent.read_file("/etc/blob") == data
        agent.write_file("/etc/empty", b"")
        assert agent.read_file("/etc/empty") == b""
        with pytest.raises(AgentCommandError):
            agent.read_file("/nonexistent")
    assert len(server.commands("guest-file-write")) == 3
    chmod = [r for r in server.commands("guest-exec") if r["arguments"]["path"] == "chmod"]
    assert chmod[0]["arguments"]["arg"] == ["600", "/etc/blob"]
    assert server.handles == {}  # every handle closed, even after the error


def test_fsfreeze_and_thaw(sock, fake):
    fake()
    with GuestAgent(sock, timeout=2) as agent:
        assert agent.fsfreeze() == 2
        assert agent.fsfreeze_status() == "frozen"
        assert agent.fsthaw() == 2
        assert agent.fsfreeze_status() == "thawed"


def test_lost_connection_raises_then_reconnects(sock, fake):
    server = fake(drop_after=2)  # the sync and one command
    with GuestAgent(sock, timeout=2) as agent:
        agent.ping()
        with pytest.raises(AgentError):
            agent.ping()
        agent.ping()
    assert server.connections == 2


def test_shutdown_does_not_wait_and_the_next_command_resyncs(sock, fake):
    server = fake()
    with GuestAgent(sock, timeout=2) as agent:
        agent.shutdown()
        agent.ping()
    assert [r["execute"] for r in server.requests] == [
        "guest-sync-delimited",
        "guest-shutdown",
        "guest-sync-delimited",
        "guest-ping",
    ]


# ---- scripts in the guest: private, unpredictable paths (issue 12, section 4) -------------------

def _run_here(argv, script, tmpdir):
    import subprocess

    return subprocess.run(argv, input=script, capture_output=True, env={"PATH": os.environ["PATH"], "TMPDIR": str(tmpdir)})


@pytest.mark.parametrize("interpreter", ["/bin/sh", None])
def test_script_runs_from_a_private_dir_then_goes(tmp_path, interpreter):
    from pcocc.agent.qga import run_script_argv

    script = b'#!/bin/sh\necho "[$1] [$2]"; ls -ld "$(dirname "$0")" | cut -c1-10; exit 7\n'
    r = _run_here(run_script_argv(["a b", "$HOME"], interpreter=interpreter), script, tmp_path)
    assert r.returncode == 7, r.stderr
    assert r.stdout.decode().splitlines() == ["[a b] [$HOME]", "drwx------"]
    assert list(tmp_path.iterdir()) == []  # removed after


def test_script_path_is_not_predictable_and_links_are_not_followed(tmp_path):
    from pcocc.agent.qga import run_script_argv

    victim = tmp_path / "victim"
    victim.write_text("safe")
    for name in ("pcocc-script", "pcocc-exec-1", "pcocc-batch-1", "pcocc-script.XXXXXXXXXX"):
        (tmp_path / name).symlink_to(victim)
    seen = set()
    for _ in range(3):
        r = _run_here(run_script_argv(), b'echo "$0"', tmp_path)
        assert r.returncode == 0
        seen.add(r.stdout.strip())
    assert len(seen) == 3  # a new random directory each time
    assert victim.read_text() == "safe"


class _RecordingAgent:
    def __init__(self):
        self.argv = None

    def exec(self, argv, input=None, timeout=None):
        self.argv = argv
        return 0, b"", b""


@pytest.mark.parametrize("user", ["-c id", "--login", "-", "a b", "x;id", "é"])
def test_vm_side_refuses_user_names_that_are_not_names(user):
    from pcocc.errors import UsageError
    from pcocc.lifecycle.control import ControlHandler

    agent = _RecordingAgent()
    with pytest.raises(UsageError):
        ControlHandler(None, agent).op_exec(["id"], user=user)
    assert agent.argv is None  # nothing ran


def test_vm_side_gives_su_the_user_after_double_dash():
    from pcocc.lifecycle.control import ControlHandler

    agent = _RecordingAgent()
    ControlHandler(None, agent).op_exec(["id", "-u"], user="alice")
    assert agent.argv == ["su", "-s", "/bin/sh", "--", "alice", "-c", "id -u"]
    ControlHandler(None, agent).op_exec(["id"], user="root")
    assert agent.argv == ["id"]
