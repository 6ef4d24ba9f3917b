"""pcocc exec, console, reset, monitor-cmd, dump: reach the VMs of a cluster through
their control endpoints (ssh, scp and nc, through the network, are in remote.py)."""

import os
import re
import sys

import click

from pcocc.cli import params
from pcocc.cli.core import pass_app
from pcocc.errors import NotFoundError, PcoccError, UsageError
from pcocc.phases import STARTING_PHASES


def job_options(f):
    f = click.option("-J", "--jobname", type=params.JOB_NAME, help="Job name of the cluster.")(f)
    return click.option("-j", "--jobid", type=params.JOB_ID, help="Job id of the cluster (default: $PCOCC_JOB_ID, or your only cluster).")(f)


EXEC_START_WAIT = 300.0  # seconds exec waits for VMs still starting (a Debian guest takes about 50 s under emulation)
# After Ctrl-C, exec waits for every VM to confirm that the command's process group was killed.
# A loaded host takes seconds (measured: up to 2.5 s for 4 VMs on 2 cores); after EXEC_KILL_NOTICE
# it says which VMs it still waits for, and gives up after EXEC_KILL_LIMIT: the VM side's own
# bound (one agent call of 30 s, GuestAgent's timeout in lifecycle.vmrun, for the kill and one
# for the status), with a margin. A second Ctrl-C returns at once.
EXEC_KILL_NOTICE = 2.0
EXEC_KILL_LIMIT = 75.0
EXEC_OPEN_TIMEOUT = 60.0  # seconds for a VM's stream to open (its command started), per hop (agent.relay)
EXEC_FAILED = 255  # exec's status when pcocc itself failed on a VM (ssh's rule, ssh(1) EXIT STATUS)
_STARTING = STARTING_PHASES + ("submitting", "temporary-disk")  # a VM's phases before it runs
QEMU_UP = ("booting", "running")  # reset, monitor-cmd and dump need only qemu: a guest stuck in its boot can be reset


def not_running(vm):
    """The error for a VM record that is not running."""
    return f"{vm['name']} is not running (state: {vm.get('state')}{', ' + vm['error'] if vm.get('error') else ''})"


class Targets:
    """The VMs a command acts on, with the credentials to reach their endpoints."""

    def __init__(self, app, jobid, jobname, vmset, exclude=None):
        from pcocc.cluster import parse_vmset

        self.backend = app.ctx.backend()
        self.jobid = self.backend.find(jobid, jobname)
        self.info, self.vms = self.backend.job(self.jobid)
        self.ranks = parse_vmset(vmset, len(self.vms), exclude=exclude)
        self.creds = self.backend.credentials(self.jobid)

    def _not_running(self, vm):
        return not_running(vm)

    def wait_started(self, app, limit=EXEC_START_WAIT):
        """Waits (at most limit seconds, saying so on stderr) while a target VM is still starting."""
        import time

        deadline = time.monotonic() + limit
        said = False
        while True:
            starting = [self.vms[r] for r in self.ranks
                        if self.vms[r].get("state") in _STARTING or (self.vms[r].get("state") == "running" and not self.vms[r].get("control"))]
            if not starting or time.monotonic() >= deadline:
                return
            if not said:
                names = ", ".join(f"{vm['name']} ({vm.get('state')})" for vm in starting[:4]) + (" ..." if len(starting) > 4 else "")
                app.info(f"pcocc: waiting for VMs still starting: {names}")
                said = True
            time.sleep(0.5)
            self.info, self.vms = self.backend.job(self.jobid)

    def call_all(self, op, args, timeout=None, states=("running",)):
        """{vm name: (ok, result or error message)}, for every target VM (in none of states: an
        error), through the host relays when the records name their unix sockets (agent.relay),
        else one TLS connection per VM, 16 at a time; timeout: seconds for each VM's answer, per hop.
        states: those a VM may be in ("booting" too for what needs only qemu: its endpoint
        answers from then on, lifecycle.vmrun)."""
        from pcocc.agent import relay
        from pcocc.agent.endpoint import DEFAULT_TIMEOUT

        running, down = [], {}
        for r in self.ranks:
            vm = self.vms[r]
            if vm.get("state") in states and vm.get("control"):
                running.append(vm)
            else:
                down[vm["name"]] = (False, self._not_running(vm))
        results = relay.call(relay.plan(running), op, args, connect=lambda link, t: self.connect(link["address"], t),
                             timeout=timeout or DEFAULT_TIMEOUT) if running else {}
        return {self.vms[r]["name"]: ({**results, **down})[self.vms[r]["name"]] for r in self.ranks}

    def connect(self, address, timeout):
        """A ControlClient of the endpoint at address (a VM's, or a host leader's) with the owner's credentials."""
        from pcocc.agent.endpoint import ControlClient

        return ControlClient(tuple(address), ca_pem=self.creds["ca"], cert_pem=self.creds["cert"], key_pem=self.creds["key"], timeout=timeout)

    def call_one(self, op, states=("running",), **args):
        """op(**args) on the first target VM, which must be in one of states (see call_all)."""
        from pcocc.agent.endpoint import ControlClient

        vm = self.vms[self.ranks[0]]
        if vm.get("state") not in states or not vm.get("control"):
            raise PcoccError(self._not_running(vm))
        with ControlClient(tuple(vm["control"]), ca_pem=self.creds["ca"], cert_pem=self.creds["cert"], key_pem=self.creds["key"], timeout=None) as c:
            return c.call(op, **args)

    def client(self, rank, timeout):
        """A ControlClient of the VM of that rank; raises PcoccError when it is not running."""
        from pcocc.agent.endpoint import ControlClient

        vm = self.vms[rank]
        if vm.get("state") != "running" or not vm.get("control"):
            raise PcoccError(self._not_running(vm))
        return ControlClient(tuple(vm["control"]), ca_pem=self.creds["ca"], cert_pem=self.creds["cert"], key_pem=self.creds["key"], timeout=timeout)


def _fold(names):
    """['vm0', 'vm1', 'vm2', 'vm5'] -> 'vm[0-2,5]' (clush style, through ClusterShell's NodeSet)."""
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(names))


@click.command("exec", context_settings={"allow_interspersed_args": False})
@job_options
@click.option("-w", "--vms", "vmset", default="all", show_default=True, help="VMs to run on, a clush node set: vm0, vm[0-3,5], vm[0-7]!vm3, or all.")
@click.option("-x", "--exclude", help="VMs to leave out (a node set, as clush -x).")
@click.option("-i", "--index", type=params.Count("VM index", 0), help="Run on this VM only (upstream's option; same as -w vmN).")
@click.option("-u", "--user", type=params.USER_NAME, help="Run as this user in the VMs (default: root); a POSIX portable name, not starting with '-'.")
@click.option("-s", "--script", is_flag=True, help="CMD is a local script: copy it to the VMs and run it with its own interpreter (its #! line; /bin/sh without one).")
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), default=None, help="Kill the command after this many seconds (exit status 9).")
@click.option("-b", "--gather", is_flag=True, help="Print each distinct output once at the end, with the VMs that gave it (clush -b).")
@click.option("-n", "--no-stdin", is_flag=True, help="Read no stdin (else, when it is not a terminal, it goes to the command in every VM).")
@click.option("--pty", is_flag=True, help="Interactive: run CMD (a shell, top...) on a terminal in one VM, with your keystrokes, Ctrl-C included (script(1) in the guest).")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_app
def exec_(app, jobid, jobname, vmset, exclude, index, user, script, timeout, gather, no_stdin, pty, cmd):
    """Run CMD in VMs through their guest agents, with its output as it comes.

    CMD runs through the guest's shell (sh -c): one word is a command line ('ls *.txt'),
    several are a command and its arguments, passed as they are (quoted for the shell).
    With several VMs each line is prefixed 'vmN: ', and a non-zero exit status is told
    on stderr as 'vmN: exited with status S'; with one VM its output is passed as it is.
    stdin goes to every VM unless it is a terminal or -n is given.  Ctrl-C or -t kills
    the command and its children in every VM.  --pty (one VM, stdin a terminal): CMD
    runs on a terminal of the guest, the local one in raw mode; Ctrl-C goes to CMD.

    Exit status: the highest of the commands' statuses; 255 when pcocc could not run or
    follow it in some VM (as ssh); 9 when -t ran out; 130 after Ctrl-C (docs/exec.md).
    """
    import sys

    from pcocc.agent.qga import MAX_SCRIPT, run_script_argv

    if pty and (script or gather or no_stdin):
        raise UsageError("--pty cannot be combined with -s, -b or -n")
    targets = Targets(app, jobid, jobname, f"vm{index}" if index is not None else vmset, exclude)
    if pty:
        if len(targets.ranks) != 1:
            raise UsageError("--pty runs on one VM: name it with -w vmN")
        tty_fd = _terminal_fd(app)
        if tty_fd is None:
            raise UsageError("--pty needs a terminal on stdin")
    targets.wait_started(app)
    args = {"user": user}
    stdin = None
    if script:
        from pcocc.agent.endpoint import encode_bytes

        try:
            with open(cmd[0], "rb") as f:
                data = f.read(MAX_SCRIPT + 1)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise NotFoundError(f"cannot read script {cmd[0]}: {getattr(exc, 'strerror', None) or exc}") from None
        if len(data) > MAX_SCRIPT:
            raise UsageError(f"script {cmd[0]}: larger than {MAX_SCRIPT} bytes: copy big files with 'pcocc scp' and run a small script")
        # the script goes to a private directory of a random name in each VM (mktemp -d, as the
        # user it runs as), and is executed there: the kernel runs its #! line, sh runs a script without one
        args.update(argv=run_script_argv(cmd[1:], interpreter=None), input_b64=encode_bytes(data))
    else:
        import shlex

        # one word is a command line; several are a command and its arguments, quoted for the shell
        args["argv"] = ["/bin/sh", "-c", cmd[0] if len(cmd) == 1 else shlex.join(cmd)]
        stream_in = getattr(app.env, "stdin", None) or sys.stdin
        try:
            fd = stream_in.fileno()
        except (AttributeError, ValueError, OSError):
            fd = None
        if not no_stdin and fd is not None and not os.isatty(fd) and not _is_dev_null(fd):
            stdin = fd
    if timeout:
        args["timeout"] = timeout
    if pty:
        args["argv"] = pty_argv(args["argv"][2], *_window(tty_fd), os.environ.get("TERM"))
        status = _run_raw(tty_fd, lambda: _ExecRun(app, targets, args, tty_fd, False).run())
    else:
        status = _ExecRun(app, targets, args, stdin, gather).run()
    if status:
        raise click.exceptions.Exit(status)


def pty_argv(line, rows, cols, term=None):
    """argv running the shell command line on a new terminal in the guest, of rows x cols characters.

    script(1) of util-linux (bsdutils in Debian; 2.35 or later, which read a stdin that is
    not a terminal) makes the pseudo-terminal: `script -q -e -c CMD /dev/null` runs CMD
    through the shell on it, logs nothing (/dev/null), and exits with CMD's status (-e; 128+N
    for a signal N). stty(1) gives the terminal its size before CMD starts; TERM (the local
    one, when it is made of letters, digits, '-', '+', '.' and '_') tells CMD what it draws on.
    Ctrl-C on the terminal interrupts CMD: the exec runner starts every command with SIGINT
    and SIGQUIT at their default (agent.qga's runner, docs/exec.md).
    """
    import re
    import shlex

    setup = f"stty rows {int(rows)} cols {int(cols)} 2>/dev/null; "
    if term and re.fullmatch(r"[A-Za-z0-9.+_-]{1,64}", term):
        setup = f"TERM={term}; export TERM; " + setup
    script = "script -q -e -c " + shlex.quote(setup + line) + " /dev/null"
    return ["/bin/sh", "-c", f"exec {script}"]


def _terminal_fd(app):
    """The fd of the local stdin when it is a terminal, else None."""
    stream_in = getattr(app.env, "stdin", None) or sys.stdin
    try:
        fd = stream_in.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    return fd if os.isatty(fd) else None


def _window(fd):
    """(rows, columns) of the terminal fd (80x24 when it has none: ssh's default)."""
    try:
        size = os.get_terminal_size(fd)
        if size.lines and size.columns:
            return size.lines, size.columns
    except OSError:
        pass
    return 24, 80


def _run_raw(fd, body):
    """body() with the terminal fd in raw mode (keystrokes pass at once, Ctrl-C as a byte, no local
    echo: the guest's terminal echoes), restored afterwards whatever happens."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        return body()
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _is_dev_null(fd):
    """True when fd is /dev/null: nothing to forward, and the VMs need not start a feeder."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(os.devnull))
    except OSError:
        return False


class _ExecRun:
    """One streamed exec over the target VMs: a single thread multiplexes their streams,
    the local stdin and Ctrl-C (see docs/exec.md)."""

    def __init__(self, app, targets, args, stdin_fd, gather):
        self.app = app
        self.targets = targets
        self.args = {**args, "stdin": stdin_fd is not None}
        self.stdin_fd = stdin_fd
        self.gather = gather
        self.names = [targets.vms[r]["name"] for r in targets.ranks]
        self.many = len(self.names) > 1
        self.fanout = None  # agent.relay.Fanout, once started
        self.pending = set()  # names whose stream is not open yet
        self.open = set()  # names whose command runs
        self.credit = {}  # name -> stdin bytes it may still take
        self.status = {}  # name -> its command's status
        self.failed = {}  # name -> pcocc's error message
        self.timed_out = set()
        self.partial = {}  # (name, fd) -> the start of a line not yet printed
        self.gathered = {}  # name -> its whole stdout (with -b)
        self.interrupted = 0

    # ---- output ---------------------------------------------------------------------------------

    def _write(self, err, data):
        stream = self.app.env.stderr if err else self.app.env.stdout
        buf = getattr(stream, "buffer", None)
        if buf is not None:
            stream.flush()
            buf.write(data)
            buf.flush()
        else:
            stream.write(data.decode(errors="replace"))
            stream.flush()

    def _output(self, name, err, data):
        if self.gather and not err:
            self.gathered[name] = self.gathered.get(name, b"") + data
            return
        if not self.many:
            self._write(err, data)
            return
        key = (name, err)
        text = self.partial.pop(key, b"") + data
        lines = text.split(b"\n")
        if lines[-1]:
            self.partial[key] = lines[-1]
        whole = lines[:-1]
        if whole:
            prefix = name.encode() + b": "
            self._write(err, b"".join(prefix + line + b"\n" for line in whole))

    def _flush_partial(self, name):
        for err in (False, True):
            rest = self.partial.pop((name, err), None)
            if rest:
                self._write(err, name.encode() + b": " + rest + b"\n")

    def _say(self, text):
        self._write(True, (text + "\n").encode())

    # ---- life -----------------------------------------------------------------------------------

    def _start(self):
        """Opens every VM's stream at once through agent.relay.Fanout: a tree of host relays
        when the VM records name their unix sockets (at most 16 TLS connections from here),
        else one TLS connection per VM, opened by 16 threads. The loop takes each VM's events
        as they come, so that the output of the first VMs is printed while others still start."""
        from pcocc.agent import relay

        running = []
        for r in self.targets.ranks:
            vm = self.targets.vms[r]
            if vm.get("state") == "running" and vm.get("control"):
                running.append(vm)
            else:
                self._fail(vm["name"], not_running(vm))
        rank_of = {self.targets.vms[r]["name"]: r for r in self.targets.ranks}

        def connect(link, timeout):
            if "vm" in link:  # a VM reached directly (records without a unix socket)
                return self.targets.client(rank_of[link["vm"]], timeout)
            return self.targets.connect(link["address"], timeout)  # a host leader

        self.pending = {vm["name"] for vm in running}
        self.fanout = relay.Fanout(relay.plan(running), "exec_stream", self.args, connect=connect, open_timeout=EXEC_OPEN_TIMEOUT)
        self.fanout.start()

    def _fail(self, name, message):
        self.failed[name] = message
        self._flush_partial(name)
        self._say(f"pcocc: error: {message if message.startswith(name + ' ') else name + ': ' + message}")
        self.pending.discard(name)
        self.open.discard(name)
        if self.fanout is not None:
            self.fanout.drop(name)  # its stream is closed: the VM kills the command if it still runs

    def _end(self, name, result):
        result = result if isinstance(result, dict) else {}
        self._flush_partial(name)
        self.pending.discard(name)
        self.open.discard(name)
        if result.get("timed_out"):
            self.timed_out.add(name)
        code = int(result.get("status", 0) or 0)
        self.status[name] = code
        if result.get("timed_out"):
            self._say(f"{name}: killed after the timeout")
        elif code and self.many and not self.interrupted:
            self._say(f"{name}: exited with status {code}")

    def run(self):
        """The exit status (see exec's help)."""
        import signal

        def on_signal(signum, frame):
            self.interrupted += 1
            if self.interrupted > 1 and not self._looping:
                raise KeyboardInterrupt  # still connecting: leave now (the loop handles it after)

        # a signal also writes a byte to this pipe, which wakes the loop's poll at once
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        saved = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            saved_wake = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread (an embedding program): the poll's 0.1 s then
            saved_wake = None
        self._looping = False
        try:
            self._start()
            self._looping = True
            self._loop()
        finally:
            if saved_wake is not None:
                signal.set_wakeup_fd(saved_wake)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            for name in [n for n in self.names if n in self.pending]:
                self._fail(name, "interrupted while its command started")
            if self.fanout is not None:
                self.fanout.close()
            os.close(self._wake_r)
            os.close(wake_w)
        if self.gather:
            self._print_gathered()
        if self.interrupted:
            return 130
        if self.failed:
            return EXEC_FAILED
        if self.timed_out:
            return 9  # ExitStatus.TIMEOUT
        return min(max(self.status.values(), default=0), 255)

    def _loop(self):
        import time

        killed_at = None
        noticed = False
        stdin_checked = False
        while self.open or self.pending:
            if self.interrupted and killed_at is None:
                killed_at = time.monotonic()
                self.fanout.send("all", {"signal": "KILL"})  # those still starting get it once started
            if killed_at is not None:
                waited = time.monotonic() - killed_at
                if self.interrupted > 1 or waited > EXEC_KILL_LIMIT:
                    # true either way: each VM kills the command when its client leaves
                    why = "interrupted again" if self.interrupted > 1 else f"no answer in {EXEC_KILL_LIMIT:g} s"
                    for name in [n for n in self.names if n in self.open or n in self.pending]:
                        self._fail(name, f"the kill of the command was not confirmed ({why}); the VM kills it as its client left")
                    break
                if waited > EXEC_KILL_NOTICE and not noticed:
                    noticed = True
                    self._say(f"pcocc: waiting for {_fold([*self.open, *self.pending])} to confirm the kill (Ctrl-C again to leave now)")
            # stdin goes to every VM from its start: once every stream is open
            want_stdin = (self.stdin_fd is not None and not self.interrupted and not self.pending
                          and all(self.credit.get(n, 0) > 0 for n in self.open))
            items, readable = self.fanout.pump(0.1, ([self.stdin_fd] if want_stdin else []) + [self._wake_r])
            if self._wake_r in readable:
                os.read(self._wake_r, 64)
            for item in items:
                self._item(item)
            if want_stdin and self.stdin_fd in readable and not self.interrupted and self.open:
                self._pass_stdin()
            if not self.pending and not stdin_checked:  # every stream opened: stdin goes to none if none takes it
                stdin_checked = True
                if self.stdin_fd is not None and not any(self.credit.get(n, 0) for n in self.open):
                    self.stdin_fd = None

    def _item(self, item):
        """One item of the fan-out (agent.relay: an event, the result or an error of a VM)."""
        name = item.get("vm")
        if name not in self.open and name not in self.pending:
            return
        if "event" in item:
            event = item["event"] if isinstance(item["event"], dict) else {}
            if name in self.pending:  # its first event: the command started
                self.pending.discard(name)
                self.open.add(name)
                self.credit[name] = int(event.get("stdin_window") or 0)
                if self.interrupted:
                    self.fanout.send(name, {"signal": "KILL"})
                return
            self._event(name, event)
        elif "result" in item:
            self._end(name, item["result"])
        else:
            self._fail(name, str(item.get("error")))

    def _event(self, name, value):
        if "out_b64" in value or "err_b64" in value:
            from pcocc.agent.endpoint import decode_bytes

            err = "err_b64" in value
            try:
                data = decode_bytes(value["err_b64" if err else "out_b64"])
            except ValueError:
                self._fail(name, "the VM sent malformed output")
                return
            self._output(name, err, data)
        elif "stdin_credit" in value:
            self.credit[name] = self.credit.get(name, 0) + int(value["stdin_credit"])

    def _pass_stdin(self):
        from pcocc.agent.endpoint import encode_bytes

        room = min(self.credit.get(n, 0) for n in self.open)
        try:
            data = self._read_stdin(min(room, 256 * 1024))
        except OSError as exc:
            self._say(f"pcocc: warning: reading stdin: {exc.strerror}")
            data = b""
        # one message for all: each relay passes it to its VMs (a failure comes back as an error item)
        self.fanout.send("all", {"stdin_b64": encode_bytes(data)} if data else {"stdin_eof": True})
        for name in self.open:
            self.credit[name] = self.credit.get(name, 0) - len(data)
        if not data:
            self.stdin_fd = None

    def _read_stdin(self, size):
        """At most size bytes of the local stdin (b"" at its end); raises OSError. pcocc cp counts them here."""
        return os.read(self.stdin_fd, size)

    def _print_gathered(self):
        groups = {}
        for name in self.names:
            out = self.gathered.get(name, b"")
            if out:
                groups.setdefault(out, []).append(name)
        for out, names in groups.items():
            header = f"{_fold(names)} ({len(names)})"
            self._write(False, ("-" * 15 + "\n" + header + "\n" + "-" * 15 + "\n").encode() + out + (b"" if out.endswith(b"\n") else b"\n"))


@click.command()
@job_options
@click.option("-l", "--log", "show_log", is_flag=True, help="Print the console log instead of attaching.")
@click.argument("vm", default="vm0")
@pass_app
def console(app, jobid, jobname, show_log, vm):
    """Attach to the serial console of VM (default vm0); Ctrl-] detaches.

    From any host: on the VM's own host through its console socket, from another one (a
    login node) through the VM's control endpoint, as the original pcocc did.
    """
    targets = Targets(app, jobid, jobname, vm)
    info = targets.vms[targets.ranks[0]]
    if info.get("host") and info["host"] != app.ctx.hostname:
        return _remote_console(app, targets, info, show_log)
    rundir = info.get("rundir") or os.path.join(targets.info["rundir"], info["name"])
    if show_log:
        try:
            with open(os.path.join(rundir, "console.log"), "rb") as f:
                app.env.stdout.write(f.read().decode(errors="replace"))
        except OSError:
            raise NotFoundError(f"no console log for {info['name']} (is it running?)") from None
        return
    _attach(os.path.join(rundir, "console.sock"), app)


def _remote_console(app, targets, vm, show_log):
    """console and console -l of a VM of another host, through its control endpoint (the ops
    console_log and console of lifecycle.control)."""
    from pcocc.agent.endpoint import ControlClient, decode_bytes

    if vm.get("state") not in ("booting", "running") or not vm.get("control"):  # its endpoint answers from booting on
        raise PcoccError(targets._not_running(vm))
    creds = targets.creds
    client = ControlClient(tuple(vm["control"]), ca_pem=creds["ca"], cert_pem=creds["cert"], key_pem=creds["key"])
    try:
        if show_log:
            res = client.call("console_log")
            if res.get("cut"):
                app.info(f"pcocc: the first {res['cut']} bytes of {vm['name']}'s console log are left out")
            app.env.stdout.write(decode_bytes(res["data_b64"]).decode(errors="replace"))
            return
        stream = client.stream("console")
        _attach_stream(stream, app)
    finally:
        client.close()


def _attach_stream(stream, app):
    """The console over a console stream of the control endpoint (another host's VM)."""
    from pcocc.agent.endpoint import decode_bytes, encode_bytes

    def receive():
        if stream.done:
            return None
        kind, value = stream.receive(0)
        return decode_bytes(value["out_b64"]) if kind == "event" and "out_b64" in value else b""

    _terminal_loop(app, stream, receive, lambda data: stream.send({"in_b64": encode_bytes(data)}), stream.ready)


def _attach(path, app):
    """The console through the VM's console socket (a VM of this host)."""
    import socket

    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
    except OSError as exc:
        raise PcoccError(f"cannot attach to the console {path}: {exc.strerror} (is the VM running?)") from None
    try:
        _terminal_loop(app, sock, lambda: sock.recv(4096) or None, sock.sendall)
    finally:
        sock.close()


def _terminal_loop(app, source, receive, send, buffered=lambda: False):
    """The local terminal (raw when it is one) joined to a console until Ctrl-] or its end.

    source: a selectable object; receive() -> the console's bytes (b"": nothing this time,
    None: it ended); send(bytes): keystrokes to it; buffered(): whether receive() has data
    select() cannot see (TLS)."""
    import select
    import termios
    import tty

    app.info("attached to the console; Ctrl-] detaches")
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if saved:
            tty.setraw(fd)
        while True:
            ready = [source] if buffered() else select.select([source, fd], [], [])[0]
            if source in ready:
                data = receive()
                if data is None:
                    break
                if data:
                    os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or b"\x1d" in data:
                    keys = data.split(b"\x1d")[0]
                    if keys:  # what came before Ctrl-] still goes
                        send(keys)
                    break
                send(data)
    finally:
        if saved:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    app.info("\ndetached")


@click.command()
@job_options
@click.argument("vms", default="vm0")
@pass_app
def reset(app, jobid, jobname, vms):
    """Hard-reset VMS (default vm0; e.g. vm[0-3] or all).

    The guest boots again: 'pcocc ps --vms' shows it booting until its guest
    agent answers (exec waits for that). A VM still booting can be reset too.
    """
    _report(app, Targets(app, jobid, jobname, vms).call_all("reset", {}, states=QEMU_UP), "reset")


_VM_WORD = re.compile(r"vm[0-9]+")


@click.command("monitor-cmd", context_settings={"allow_interspersed_args": False})
@job_options
@click.option("-w", "--vms", default=None, help="VMs: vm0, vm[0-3,5] or all (default: vm0).")
@click.argument("command", nargs=-1, required=True, metavar="[VM] COMMAND...")
@pass_app
def monitor_cmd(app, jobid, jobname, vms, command):
    """Send COMMAND to the qemu monitor of VMs (e.g. 'info registers'), as it is.

    The VM may come first, as in the original pcocc: 'pcocc monitor-cmd vm1 info version'
    is 'pcocc monitor-cmd -w vm1 info version'; 'pcocc monitor-cmd help' asks vm0.
    """
    if _VM_WORD.fullmatch(command[0]):
        if vms is not None:
            raise UsageError(f"two VM lists: -w {vms} and {command[0]}: give one")
        vms, command = command[0], command[1:]
        if not command:
            raise UsageError(f"no monitor command for {vms} (e.g. 'pcocc monitor-cmd {vms} info version')")
    results = Targets(app, jobid, jobname, vms or "vm0").call_all("monitor_cmd", {"command": " ".join(command)}, states=QEMU_UP)
    failed = False
    for name, (ok, res) in results.items():
        if len(results) > 1:
            app.out(f"--- {name}")
        if ok:
            app.env.stdout.write(res["output"])
        else:
            failed = True
            app.env.stderr.write(f"pcocc: error: {name}: {res}\n")
    if failed:
        raise click.exceptions.Exit(1)


@click.command()
@job_options
@click.argument("vm")
@click.argument("dumpfile", type=click.Path(dir_okay=False))
@pass_app
def dump(app, jobid, jobname, vm, dumpfile):
    """Dump the memory of VM to DUMPFILE (ELF, for crash or gdb), written on the VM's host."""
    path = os.path.abspath(dumpfile)
    if os.path.exists(path):
        raise PcoccError(f"{path} already exists")
    app.info(f"dumping {vm} to {path}")
    res = Targets(app, jobid, jobname, vm).call_one("dump", states=QEMU_UP, path=path)
    app.info(f"wrote {res['path']}")


def _report(app, results, what):
    failed = [f"{n}: {r}" for n, (ok, r) in results.items() if not ok]
    for line in failed:
        app.env.stderr.write(f"pcocc: error: {line}\n")
    ok = [n for n, (good, _) in results.items() if good]
    if ok:
        app.info(f"{what}: {_fold(ok)}")
    if failed:
        raise click.exceptions.Exit(1)
