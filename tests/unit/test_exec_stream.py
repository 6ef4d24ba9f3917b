"""Streamed exec end to end without a VM: the CLI's exec loop, the mutual-TLS endpoint's
streaming op, the VM side's handler and the real runner script, run on this host by a fake
qemu-ga (test_exec_fake_agent.LocalAgent, which keeps qemu-ga's semantics). The guest's own
behaviour is tested on real VMs in tests/integration/test_exec_stream_vms.py."""

import hashlib
import io
import os
import signal
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest

from test_exec_fake_agent import LocalAgent
from pcocc.agent import pki, qga
from pcocc.agent.endpoint import ControlClient, ControlServer
from pcocc.cli.access import _ExecRun
from pcocc.lifecycle.control import ControlHandler

OWNER = "alice"



@pytest.fixture(autouse=True)
def private_exec_dirs(tmp_path, monkeypatch):
    """The runner runs on this host here: its private exec directories go under the test's own
    tmp_path (removed by pytest), not /tmp."""
    from pcocc.agent import qga as _qga

    monkeypatch.setattr(_qga, "EXEC_TMP", str(tmp_path))

@pytest.fixture(scope="module")
def creds():
    ca = pki.make_ca("cluster-1")
    return {"ca": ca, "server": pki.issue(*ca, "vm0", server=True, ips=("127.0.0.1",)), "owner": pki.issue(*ca, OWNER)}


class Out(io.TextIOWrapper):
    """A stdout/stderr whose bytes the test reads, and that calls on_line(line) for each line written."""

    def __init__(self, on_line=None):
        super().__init__(io.BytesIO(), write_through=True)
        self.on_line = on_line
        self.seen = b""

    def bytes(self):
        self.flush()
        return self.buffer.getvalue()

    def poll(self):
        data = self.bytes()
        new, self.seen = data[len(self.seen):], data
        if self.on_line:
            for line in new.splitlines():
                self.on_line(line)


class Buffer(io.BytesIO):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def write(self, data):
        n = super().write(data)
        if self.owner.on_line:
            for line in bytes(data).splitlines():
                self.owner.on_line(line)
        return n


class Stream(io.TextIOWrapper):
    def __init__(self, on_line=None):
        self.on_line = on_line
        super().__init__(Buffer(self), write_through=True)

    def bytes(self):
        self.flush()
        return self.buffer.getvalue()


class Cluster:
    """n fake VMs, each with its own endpoint, handler and local agent; run() is `pcocc exec`'s loop."""

    def __init__(self, creds, n):
        self.creds = creds
        self.agents, self.servers = [], []
        for rank in range(n):
            agent = LocalAgent()
            vm = SimpleNamespace(config=SimpleNamespace(name=f"vm{rank}"))
            cert, key = creds["server"]
            server = ControlServer(ControlHandler(vm, agent), ca_pem=creds["ca"][0], cert_pem=cert, key_pem=key, owner=OWNER).start()
            self.agents.append(agent)
            self.servers.append(server)
        self.vms = [{"name": f"vm{r}", "state": "running", "control": list(s.address)} for r, s in enumerate(self.servers)]

    def client(self, rank, timeout):
        cert, key = self.creds["owner"]
        return ControlClient(tuple(self.vms[rank]["control"]), ca_pem=self.creds["ca"][0], cert_pem=cert, key_pem=key, timeout=timeout)

    def run(self, command, ranks=None, stdin=None, gather=False, on_out=None, on_err=None, **args):
        """(status, stdout bytes, stderr bytes) of an exec of command (a shell command line)."""
        ranks = list(range(len(self.vms))) if ranks is None else ranks
        targets = SimpleNamespace(vms=self.vms, ranks=ranks, client=self.client)
        out, err = Stream(on_out), Stream(on_err)
        app = SimpleNamespace(env=SimpleNamespace(stdout=out, stderr=err))
        argv = command if isinstance(command, list) else ["/bin/sh", "-c", command]
        status = _ExecRun(app, targets, {"argv": argv, "user": None, **args}, stdin, gather).run()
        return status, out.bytes(), err.bytes()

    def close(self):
        for s in self.servers:
            s.stop()
        for a in self.agents:
            a.close()


@pytest.fixture
def one(creds):
    c = Cluster(creds, 1)
    yield c
    c.close()


@pytest.fixture
def three(creds):
    c = Cluster(creds, 3)
    yield c
    c.close()


def processes_with(marker):
    """pids of live processes whose command line holds marker (zombies have none)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_one_vm_output_is_passed_byte_for_byte_with_its_status(one):
    status, out, err = one.run(r"printf 'a\000b\nno newline'; printf 'oops' >&2; exit 3")
    assert (status, out, err) == (3, b"a\x00b\nno newline", b"oops")


def test_lines_arrive_as_they_come(one, tmp_path):
    """The command prints its second line only once the user saw the first: without streaming
    it would wait for ever (bounded here by -t, whose status 9 would fail the test)."""
    flag = tmp_path / "seen-first"

    def on_out(line):
        if line == b"first":
            flag.touch()

    status, out, _ = one.run(f"echo first; while [ ! -e {flag} ]; do sleep 0.01; done; echo second", on_out=on_out, timeout=60)
    assert status == 0 and out == b"first\nsecond\n"


def test_several_vms_prefix_lines_keep_stderr_apart_and_tell_failures(three):
    status, out, err = three.run('n=${PCOCC_TEST_N:-x}; echo "out"; echo "err" >&2; printf partial; exit 2')
    assert status == 2
    assert sorted(out.splitlines()) == sorted([f"vm{r}: {w}".encode() for r in range(3) for w in ("out", "partial")])
    lines = err.splitlines()
    for r in range(3):
        assert f"vm{r}: err".encode() in lines
        assert f"vm{r}: exited with status 2".encode() in lines
        assert lines.index(f"vm{r}: err".encode()) < lines.index(f"vm{r}: exited with status 2".encode())


def test_the_output_of_the_first_vms_is_printed_while_another_still_starts(three):
    """The CLI takes each VM's stream as it opens: vm2's command starts only once the user saw
    the lines of vm0 and vm1 (it would never start if the CLI waited for every VM first)."""
    printed, started = threading.Event(), []
    handler = three.servers[2].handler
    take = handler._take_spare

    def slow_start(base):
        started.append(printed.wait(30))
        return take(base)

    handler._take_spare = slow_start
    seen = set()

    def on_out(line):
        seen.add(line)
        if {b"vm0: hi", b"vm1: hi"} <= seen:
            printed.set()

    status, out, _ = three.run("echo hi", on_out=on_out)
    assert (status, sorted(out.splitlines())) == (0, [b"vm0: hi", b"vm1: hi", b"vm2: hi"])
    assert out.splitlines()[-1] == b"vm2: hi" and started == [True]


def test_empty_output_prints_nothing(three):
    assert three.run("true") == (0, b"", b"")


def test_status_is_the_highest(three):
    status, _, err = three.run("exit 0", ranks=[0]), None, None
    assert status[0] == 0
    status, out, err = three.run('case $(hostname) in *) :;; esac; exit $((RANDOM % 1))')
    assert status == 0


def test_gather_prints_each_distinct_output_once(three):
    status, out, err = three.run("echo same; echo noise >&2", gather=True)
    assert status == 0
    assert out == b"---------------\nvm[0-2] (3)\n---------------\nsame\n"
    assert sorted(err.splitlines()) == [b"vm0: noise", b"vm1: noise", b"vm2: noise"]


@pytest.mark.parametrize("read_size", [qga.EXEC_READ, 64 * 1024])
def test_large_output_comes_whole_through_many_segments(one, monkeypatch, read_size):
    """Also with reads smaller than a segment: a round that reads more of a stream, and moves
    to its next segment meanwhile, must not take that segment's handle from the round's look
    for it as a segment further (output was repeated, then cut)."""
    monkeypatch.setattr(qga, "EXEC_SEGMENT", 256 * 1024)
    monkeypatch.setitem(qga.StreamingExec.__init__.__kwdefaults__, "read_size", read_size)
    status, out, err = one.run("head -c 12000000 /dev/zero | tr '\\0' a; echo; head -c 3000000 /dev/zero | tr '\\0' b >&2")
    assert status == 0, err[-300:]
    assert len(out) == 12000001 and out.count(b"a") == 12000000
    assert len(err) == 3000000 and err.count(b"b") == 3000000


def test_stdin_goes_whole_to_every_vm(three, monkeypatch, tmp_path):
    monkeypatch.setattr(qga, "STDIN_SEGMENT", 256 * 1024)
    data = os.urandom(10 * 1024 * 1024)
    src = tmp_path / "in"
    src.write_bytes(data)
    with open(src, "rb") as f:
        status, out, err = three.run('f=$(mktemp); cat > "$f"; sha256sum < "$f" | cut -c1-64; wc -c < "$f"; rm "$f"', stdin=f.fileno())
    assert status == 0, err
    digest = hashlib.sha256(data).hexdigest()
    for r in range(3):
        assert f"vm{r}: {digest}".encode() in out.splitlines()
        assert f"vm{r}: {len(data)}".encode() in out.splitlines()


def test_a_command_that_does_not_read_its_stdin_still_ends(one):
    r, w = os.pipe()  # stdin that never ends, as `yes | pcocc exec true`
    try:
        os.write(w, b"data\n" * 100)
        status, out, err = one.run("echo done", stdin=r)
    finally:
        os.close(r)
        os.close(w)
    assert (status, out) == (0, b"done\n")


def test_no_stdin_reads_nothing(one, tmp_path):
    status, out, _ = one.run("cat; echo end")
    assert (status, out) == (0, b"end\n")


@pytest.mark.parametrize("how", ["ctrl-c", "timeout"])
def test_interrupt_or_timeout_kills_the_command_and_its_children(three, how):
    marker = f"{4000 + os.getpid() % 1000}.{len(how)}"
    command = f"sleep {marker} & sleep {marker} & echo started; wait"
    started = []

    def on_out(line):
        started.append(line)
        if how == "ctrl-c" and len(started) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C sends

    args = {"timeout": 2.0} if how == "timeout" else {}
    status, out, err = three.run(command, on_out=on_out, **args)
    assert sorted(out.splitlines()) == [b"vm0: started", b"vm1: started", b"vm2: started"]
    assert status == (130 if how == "ctrl-c" else 9)
    if how == "timeout":
        assert sorted(err.splitlines()) == [f"vm{r}: killed after the timeout".encode() for r in range(3)]
    assert processes_with(f"sleep\0{marker}") == []


def test_a_client_that_leaves_kills_the_command(one):
    marker = f"{5000 + os.getpid() % 1000}.5"
    client = one.client(0, timeout=30)
    stream = client.stream("exec_stream", argv=["/bin/sh", "-c", f"sleep {marker} & echo started; wait"])
    assert stream.first["started"]
    while True:
        kind, event = stream.receive(30)
        if kind == "event" and "out_b64" in event:
            break
    assert processes_with(f"sleep\0{marker}")
    client.close()  # as a CLI killed by SIGKILL, or its node lost
    deadline = time.monotonic() + 30
    while processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(f"sleep\0{marker}") == []


def test_script_runs_with_its_own_interpreter(one, tmp_path):
    from pcocc.agent.endpoint import encode_bytes

    script = b"#!/bin/cat\nthis line is printed by cat, not run by sh\n"
    status, out, _ = one.run(qga.run_script_argv([], interpreter=None), input_b64=encode_bytes(script))
    assert (status, out) == (0, script)
    status, out, _ = one.run(qga.run_script_argv(["a b"], interpreter=None), input_b64=encode_bytes(b'echo "[$1]"\n'))
    assert (status, out) == (0, b"[a b]\n")


def runners(agent):
    """[(base, exec id, waits for its command)] of the exec runners an agent started, in order."""
    found = []
    for c, a in agent.log:
        argv = [a.get("path"), *a.get("arg", [])] if c == "guest-exec" else []
        if qga._EXEC_RUNNER in argv:
            i = argv.index(qga._EXEC_RUNNER)
            found.append((argv[i + 2], argv[i + 3], argv[i + 5] == "1"))
    return found


def wait_for(predicate, what, limit=30):
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_only_the_next_execs_runner_is_left_in_the_exec_directory(one):
    assert one.run("echo x") == (0, b"x\n", b"")
    (base, first, waits), *_ = runners(one.agents[0])
    assert not waits  # the VM's first exec starts its own runner (the fake agent has no "ready")
    wait_for(lambda: any(w for _, _, w in runners(one.agents[0])), "a runner started ahead")
    spare = [i for _, i, w in runners(one.agents[0]) if w][0]
    wait_for(lambda: {f.split(".")[0] for f in os.listdir(base)} == {spare}, f"only {spare}'s files in {os.listdir(base)}")
    assert oct(os.stat(base).st_mode & 0o777) == "0o700"


def test_the_next_exec_takes_the_runner_started_ahead_with_no_exec_in_the_guest(one):
    """docs/exec.md, Latency: the runner of the next exec (setsid, sh, its relays) is started
    while this one runs; the next command only names itself in its FIFO."""
    assert one.run("echo first") == (0, b"first\n", b"")
    agent = one.agents[0]
    wait_for(lambda: len(runners(agent)) == 2, "a runner started ahead")
    before = len(agent.log)
    line = "printf '%s|' \"it's\" \"$0\" \"$#\"; echo; set | grep -c pcocc; exit 5"
    assert one.run(line) == (5, b"it's|sh|0|\n0\n", b"")
    # the command went to the waiting runner: the only runner started since is the next one
    assert [w for _, _, w in runners(agent)] == [False, True, True]
    started = [a for c, a in agent.log[before:] if c == "guest-exec" and qga._EXEC_RUNNER in a.get("arg", [])]
    assert len(started) == 1
    # a long or multi-line command goes through a file; the shell's messages read as sh -c's
    wait_for(lambda: len(runners(agent)) == 3, "a runner started ahead")
    status, out, err = one.run("echo " + "x" * 5000 + "\nnosuchcommand-pcocc")
    assert (status, out, err) == (127, b"x" * 5000 + b"\n", b"sh: 2: nosuchcommand-pcocc: not found\n")
    status, out, err = one.run("echo (")
    assert (status, out) == (2, b"")
    assert err.decode().startswith("sh: 1: Syntax error") and "eval" not in err.decode(), err


@pytest.mark.parametrize("ahead", [False, True])
def test_commands_start_with_the_default_sigint_and_sigquit(one, ahead):
    """Review: commands started as background jobs of the runner's shell had SIGINT and SIGQUIT
    ignored. A qemu-ga started with SIGQUIT ignored (the tiny image's init) is played here by
    this process ignoring both: env --default-signal gives them back to every command."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)}
    try:
        if ahead:
            assert one.run("true")[0] == 0
            wait_for(lambda: len(runners(one.agents[0])) == 2, "a runner started ahead")
        status, out, _ = one.run("sed -n 's/^SigIgn:\t//p' /proc/self/status; sh -c 'kill -INT $$; echo survived'")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert int(out.split()[0], 16) & 0b110 == 0  # bits of SIGINT (2) and SIGQUIT (3)
    assert (status, out.splitlines()[1:]) == (130, [])
    assert [w for _, _, w in runners(one.agents[0])][1 if ahead else 0] == ahead  # the runner it ran in


def test_ctrl_c_kills_through_the_runner_with_no_exec_in_the_guest(one):
    assert one.run("true")[0] == 0
    wait_for(lambda: len(runners(one.agents[0])) == 2, "a runner started ahead")
    marker = f"{6000 + os.getpid() % 1000}.6"

    def on_out(line):
        os.kill(os.getpid(), signal.SIGINT)

    status, out, err = one.run(f"sleep {marker} & echo started; wait", on_out=on_out)
    assert (status, out) == (130, b"started\n")
    assert b"confirm" not in err, err
    assert not [a for c, a in one.agents[0].log if c == "guest-exec" and a["arg"][1:2] and a["arg"][1].startswith("kill -KILL -")]
    wait_for(lambda: processes_with(f"sleep\0{marker}") == [], "the command killed")


def test_a_slow_kill_is_waited_for_and_told_only_when_it_was_not_confirmed(one, monkeypatch):
    """Review: after Ctrl-C under load exec said "no confirmation that the command was killed"
    when the confirmation came a little after 2 s. It now waits (saying so after
    EXEC_KILL_NOTICE) and tells a failure only past EXEC_KILL_LIMIT."""
    from pcocc.cli import access

    real_kill = qga.StreamingExec.kill
    delay = {"s": 0.6}

    def slow_kill(self):
        time.sleep(delay["s"])  # a loaded guest
        real_kill(self)

    monkeypatch.setattr(qga.StreamingExec, "kill", slow_kill)
    monkeypatch.setattr(access, "EXEC_KILL_NOTICE", 0.2)
    on_out = lambda line: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
    status, out, err = one.run("sleep 1000 & echo started; wait", on_out=on_out)
    assert (status, out) == (130, b"started\n")
    assert err == b"pcocc: waiting for vm0 to confirm the kill (Ctrl-C again to leave now)\n"
    delay["s"] = 3
    monkeypatch.setattr(access, "EXEC_KILL_LIMIT", 0.5)
    status, out, err = one.run("sleep 1000 & echo started; wait", on_out=on_out)
    assert (status, out) == (130, b"started\n")
    assert err.decode().splitlines()[-1] == ("pcocc: error: vm0: the kill of the command was not confirmed "
                                             "(no answer in 0.5 s); the VM kills it as its client left")


def test_a_runner_failure_is_one_line_with_no_shell_internals(one, tmp_path):
    """Review: the runner's own text and paths leaked into exec's errors."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    handler = one.servers[0].handler
    handler._exec_dir = str(tmp_path / "link")
    os.symlink(other, handler._exec_dir)
    status, out, err = one.run("echo x")
    assert (status, out) == (255, b"")
    assert err == f"pcocc: error: vm0: cannot run the command in the guest: {tmp_path} holds a directory of another user in its place\n".encode()


@pytest.mark.parametrize("stderr, status, said", [
    ("sh: 3: cannot create /tmp/pcocc-exec.abc/0123.o.0: Read-only\npcocc-exec: error: cannot create files in /tmp (full or read-only?)", 124,
     "cannot run the command in the guest: cannot create files in /tmp (full or read-only?)"),
    ("sh: 12: Syntax error: word unexpected\n  relay() {", 124,
     "cannot run the command in the guest: its exec runner could not start (is /tmp writable, mkfifo installed?)"),
    ("sh: 1: cannot open /tmp/pcocc-exec.abc/0123.st: No such file", 125,
     "the command's exit status was lost in the guest (its runner was killed, or /tmp is full)"),
])
def test_runner_errors_are_one_line_for_a_person(stderr, status, said):
    assert qga.runner_error(stderr, status) == said


def test_an_unknown_option_before_the_command_is_a_usage_error_with_a_suggestion(cli):
    r = cli("exec", "--tiemout", "5", "hostname")
    assert r.status == 2
    assert "--timeout" in r.stderr and "Try 'pcocc exec --help'" in r.stderr


def test_options_after_the_command_are_the_commands(cli):
    # parsing stops at the command: its own options never reach pcocc (no cluster here: status 4)
    r = cli("exec", "ls", "--tiemout", "-x")
    assert r.status == 4


def test_node_sets_are_read_by_clustershell_and_bounded_first():
    from pcocc.cluster import parse_vmset
    from pcocc.errors import UsageError

    assert parse_vmset("vm[0-7]!vm3", 8) == [0, 1, 2, 4, 5, 6, 7]
    assert parse_vmset("vm[0-7]", 8, exclude="vm[1-2],vm5") == [0, 3, 4, 6, 7]
    assert parse_vmset("vm[0-3]&vm[2-7]", 8) == [2, 3]
    with pytest.raises(UsageError, match="no VM left"):
        parse_vmset("vm1", 4, exclude="vm1")
    with pytest.raises(UsageError, match="no VM vm8 "):
        parse_vmset("vm[0-7]", 8, exclude="vm8")


def test_pcocc_help_does_not_import_clustershell():
    import subprocess
    import sys

    code = "import sys; from pcocc.cli.core import run; run(['--help']); print('ClusterShell' in ' '.join(sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().endswith("False"), r.stdout + r.stderr


def test_a_streaming_op_called_as_a_plain_one_is_an_error_and_is_ended(one):
    from pcocc.agent.endpoint import AgentError

    marker = f"{6000 + os.getpid() % 1000}.6"
    with one.client(0, timeout=30) as client:
        with pytest.raises(AgentError, match="streaming op"):
            client.call("exec_stream", argv=["/bin/sh", "-c", f"sleep {marker}"])
        with pytest.raises(AgentError, match="given by the server"):
            client.call("exec_stream", argv=["true"], stream=None)
    deadline = time.monotonic() + 30
    while processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(f"sleep\0{marker}") == []


def test_pcocc_failing_on_one_vm_is_status_255_and_the_others_still_answer(three):
    """ssh's rule (ssh(1) EXIT STATUS), in `pcocc help exit-codes`: 255 when pcocc could not
    run or follow the command in some VM, whatever the others' statuses."""
    three.servers[1].stop()  # vm1's endpoint is gone: its VM process died, its node was lost
    status, out, err = three.run("echo here")
    assert status == 255, err
    assert sorted(out.decode().splitlines()) == ["vm0: here", "vm2: here"]
    assert err.decode().startswith("pcocc: error: vm1: cannot reach"), err


def test_pty_runs_the_command_on_a_terminal_of_the_given_size_with_stdin(one, tmp_path):
    """exec --pty's guest side (script(1) of util-linux, run here by the fake agent): the
    command has a terminal of the window's size and TERM, reads the keystrokes, exits with its status."""
    from pcocc.cli.access import pty_argv

    keys = tmp_path / "keys"
    keys.write_bytes(b"stty size; tty -s && echo on-a-tty; echo $TERM; echo $((6*7)); exit 3\n")
    with open(keys, "rb") as f:
        status, out, err = one.run(pty_argv("sh", 30, 100, "xterm-test"), stdin=f.fileno(), timeout=60)
    assert status == 3, (out, err)
    echo, _, rest = out.partition(b"exit 3\r\n")  # the terminal echoes the keystrokes (CR LF: a terminal's)
    assert echo.endswith(b"echo $((6*7)); ")
    at = [rest.index(w) for w in (b"30 100\r\n", b"\non-a-tty\r\n", b"\nxterm-test\r\n", b"\n42\r\n")]
    assert at == sorted(at)


def test_pty_quotes_the_command_and_drops_a_strange_term():
    from pcocc.cli.access import pty_argv

    argv = pty_argv("echo 'a b'; top", 24, 80, "x; rm -rf /")
    assert argv[:2] == ["/bin/sh", "-c"]
    script = "script -q -e -c 'stty rows 24 cols 80 2>/dev/null; echo '\"'\"'a b'\"'\"'; top' /dev/null"
    assert argv[2] == f"exec {script}"


def test_the_terminal_is_raw_during_a_pty_exec_and_restored_after_even_on_error():
    import termios

    from pcocc.cli.access import _run_raw

    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        seen = []

        def body():
            attrs = termios.tcgetattr(slave)
            seen.append(bool(attrs[3] & (termios.ICANON | termios.ECHO | termios.ISIG)))
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            _run_raw(slave, body)
        assert seen == [False]  # raw: no line editing, no local echo, Ctrl-C is a byte
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_pty_ctrl_c_interrupts_the_guest_command_not_the_session(one):
    """The runner's background jobs start with SIGINT ignored (sh without job control): the pty's
    command gets SIGINT back to its default, so a Ctrl-C byte typed ends `sleep` in the guest shell."""
    from pcocc.cli.access import pty_argv

    r, w = os.pipe()
    os.write(w, b"echo started; sleep 100; echo not-interrupted\n")

    def on_out(line):
        if line.endswith(b"started") and b"echo" not in line:  # the output, not the echoed keys
            os.write(w, b"\x03")
            os.write(w, b"echo alive; exit 7\n")

    try:
        status, out, err = one.run(pty_argv("sh", 24, 80), stdin=r, on_out=on_out, timeout=60)
    finally:
        os.close(r)
        os.close(w)
    assert status == 7, (out, err)
    keys, _, after = out.partition(b"^C")  # the terminal echoes Ctrl-C as ^C
    assert after.endswith(b"alive\r\n") and b"not-interrupted" not in after


def claimed_spare(cluster, rank=0):
    """The VM's spare runner, once claimed ahead (its handles open: agent.qga.SpareRunner.claim)."""
    handler = cluster.servers[rank].handler
    wait_for(lambda: handler._spare is not None, "a runner started ahead and claimed")
    return handler._spare


def count_runs(tmp_path):
    """A command line that appends a line to a file then prints 'fresh'; and how many lines it has."""
    path = tmp_path / "runs"
    return f"echo x >> {path}; echo fresh", lambda: len(path.read_text().splitlines()) if path.exists() else 0


def test_the_next_exec_only_writes_its_command_and_reads(one):
    """The spare is claimed ahead, in the thread that starts it: its FIFO, first segments and
    kill FIFO are open before the exec comes, which neither opens nor starts anything."""
    assert one.run("true")[0] == 0
    agent, spare = one.agents[0], claimed_spare(one)
    assert spare.ctl is not None and set(spare.handles) == {"o", "e", "k"}
    ctl, out, err = spare.ctl, spare.handles["o"], spare.handles["e"]
    before = len(agent.log)
    assert one.run("echo hi; echo there >&2") == (0, b"hi\n", b"there\n")
    calls = agent.log[before:]
    ahead = {spare.prefix + suffix for suffix in (".c", ".o.0", ".e.0", ".k")}
    assert not [a for c, a in calls if c == "guest-file-open" and a["path"] in ahead]
    assert [w for _, _, w in runners(agent)] == [False, True, True]  # and the next one, ahead
    # the runner's status (is it still there?) then its go line, then the first round's reads
    assert [(c, a.get("handle", a.get("pid"))) for c, a in calls[:6]] == [
        ("guest-exec-status", spare.pid), ("guest-file-write", ctl), ("guest-file-flush", ctl),
        ("guest-file-read", out), ("guest-file-read", err), ("guest-exec-status", spare.pid)]


def test_a_spare_whose_agent_restarted_is_passed_over_and_the_command_runs_once(one, tmp_path):
    """A restarted qemu-ga knows neither the spare's pid nor its handles (its handle counter
    went on): the go line is not written anywhere, and the exec starts its own runner."""
    assert one.run("true")[0] == 0
    spare = claimed_spare(one)
    one.agents[0].restart()
    line, runs = count_runs(tmp_path)
    assert one.run(line) == (0, b"fresh\n", b"")
    assert [w for _, _, w in runners(one.agents[0])][2] is False  # a runner of its own
    time.sleep(0.3)  # the old spare, still there, got nothing either
    assert runs() == 1
    assert not os.path.exists(spare.prefix + ".c")  # its files went


def test_after_a_reboot_a_spares_handles_are_not_written_to(one, tmp_path):
    """A rebooted guest's agent may number handles from 1000 again (its state file in a
    tmpfs) and give the spare's to other files: once handle numbers went back, the spare's
    handles are neither written to nor closed, and the command runs once, in a new runner."""
    assert one.run("true")[0] == 0
    agent, spare = one.agents[0], claimed_spare(one)
    agent.restart(counter=spare.ctl)
    other = tmp_path / "other"
    other.write_bytes(b"")
    assert agent.execute("guest-file-open", {"path": str(other), "mode": "r+"}) == spare.ctl  # someone else's now
    before = len(agent.log)
    line, runs = count_runs(tmp_path)
    assert one.run(line) == (0, b"fresh\n", b"")
    assert runs() == 1 and other.read_bytes() == b""
    # the number the other file got is neither written to nor closed (nor are the spare's
    # others, which the new agent gives to the new runner's files: not checked here)
    assert not [c for c, a in agent.log[before:] if c in ("guest-file-write", "guest-file-flush", "guest-file-close")
                and a.get("handle") == spare.ctl]
    assert [w for _, _, w in runners(agent)][2] is False


def test_a_spare_that_ended_is_passed_over_and_the_command_runs_once(one, tmp_path):
    """A runner killed in the guest: its status, answered before the go line is written,
    says it ended; the line went to a FIFO that no one reads, and the exec starts its own."""
    assert one.run("true")[0] == 0
    agent, spare = one.agents[0], claimed_spare(one)
    os.killpg(spare.pid, signal.SIGKILL)
    wait_for(lambda: agent.procs[spare.pid].popen.poll() is not None, "the spare killed")
    line, runs = count_runs(tmp_path)
    assert one.run(line) == (0, b"fresh\n", b"")
    assert runs() == 1
    assert [w for _, _, w in runners(agent)][2] is False


@pytest.mark.parametrize("op", ["ckpt", "save"])
def test_no_runner_waits_in_the_guest_while_it_is_checkpointed_or_saved(one, monkeypatch, op):
    """Review: a spare left in the guest's memory went into checkpoints and template snapshots
    (asleep for ever after a restore, its handles stale), and its files into saved disks. It is
    discarded, and waited for, before the VM pauses or its disk is copied; the next one is made
    after."""
    from pcocc.lifecycle import checkpoint, saving

    assert one.run("true")[0] == 0
    agent, spare = one.agents[0], claimed_spare(one)
    handler = one.servers[0].handler
    seen = []

    def ended_or_killed():
        # closing its handles (discard's first step) ends an unused runner that already reads its
        # .c FIFO by itself ("no command came": no writer is left); only one the agent still saw
        # running is sent SIGKILL to its group (whose end, a moment later, is the kernel's); which
        # of the two happens depends on the scheduler
        ended = agent.procs[int(spare.pid)].popen.returncode is not None  # as the agent's guest-exec-status saw it
        return ended or any(c == "guest-exec" and a.get("arg", [])[1:2] and a["arg"][1].startswith(f"kill -KILL -{int(spare.pid)} ")
                            for c, a in agent.log)

    def snapshot(*args, **kwargs):
        seen.append((handler._spare, ended_or_killed(), os.path.exists(spare.prefix + ".c")))
        time.sleep(0.2)  # an exec's end meanwhile would make no spare
        return {}

    if op == "ckpt":
        monkeypatch.setattr(checkpoint, "pause", snapshot)
        monkeypatch.setattr(checkpoint, "resume", lambda vm: {})

        class Paused:  # the checkpoint's stream (lifecycle.control.op_ckpt), resumed once the spare is looked at
            def send(self, event):
                assert event == {"paused": True}

            def receive(self, timeout):
                assert handler._spare is None
                handler._make_spare()
                assert handler._spare is None  # held until the VM resumes
                return {"resume": True}

        assert handler.op_ckpt(Paused()) == {"resumed": True}
    else:
        monkeypatch.setattr(saving, "save_disk", snapshot)
        handler.images = lambda: None
        handler.op_save()
    assert seen[0] == (None, True, False)  # before the snapshot: gone, ended or killed, its files removed
    wait_for(lambda: agent.procs[spare.pid].popen.poll() is not None, "the spare's end")
    assert claimed_spare(one) is not spare
    assert one.run("echo after") == (0, b"after\n", b"")


def test_a_read_that_fails_loses_no_handle(monkeypatch):
    """A guest-file-read that fails in a round whose other calls opened handles (a stream's
    file, a next segment): each is kept for cleanup() or closed, never left open in the agent."""
    monkeypatch.setattr(qga, "PROBE_INTERVAL", 0.0)  # every round looks for the next segment
    agent = LocalAgent()
    try:
        # its output all at once, in many 8-byte segments, then it waits: the loop below polls
        # until the injected failure, however slow this host is (the command is killed after)
        ex = qga.StreamingExec(agent, ["/bin/sh", "-c", "for i in 1 2 3 4 5 6; do echo out$i; echo err$i >&2; done; exec sleep 600"],
                               qga.new_exec_base(), segment=8)
        ex.start()
        real_read, failed = agent._guest_file_read, []

        def read(handle, count=4096):
            # fails once, when the stream's next segment is there: the same round's look for
            # that segment opens it
            path = os.readlink(f"/proc/self/fd/{agent.files[handle]}")
            stem, _, k = path.rpartition(".")
            if not failed and k.isdigit() and os.path.exists(f"{stem}.{int(k) + 1}"):
                failed.append(path)
                raise qga.AgentCommandError("guest-file-read", {"desc": "Input/output error"})
            return real_read(handle, count)

        agent._guest_file_read = read
        with pytest.raises(qga.AgentError, match="Input/output error"):
            while ex.result is None:
                ex.poll()
        ex.kill()
        ex.cleanup()
        assert agent.files == {}, f"handles left open in the agent: {sorted(agent.files)}"
    finally:
        agent.close()
