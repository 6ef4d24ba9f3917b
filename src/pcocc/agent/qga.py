"""A synchronous client of the qemu guest agent (qemu-ga) over the unix socket of its chardev.

qemu side::

    -chardev socket,id=qga0,path=SOCK,server=on,wait=off
    -device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0

The protocol is QMP-like JSON, one object per line each way, with no greeting and
no events.  Nothing tells a client where the stream stands: replies to a previous
client, or to a request that timed out, may still come, and qemu keeps whatever
is written before the guest opens its port.  So the client resynchronises with
``guest-sync-delimited`` and a random id at connection and after any timeout: it
sends a 0xFF byte first (which resets the agent's JSON parser), the agent puts a
0xFF before its reply (which resets ours), and every reply up to the one carrying
our id is stale and dropped.

Usage::

    with GuestAgent("/run/vm0/qga.sock", timeout=10) as agent:
        agent.connect(timeout=120)           # waits for the VM to boot
        code, out, err = agent.exec(["hostname"])

``StreamingExec`` runs a command whose output comes as it is written, with no size
limit, over the standard agent only (guest-exec, guest-file-*): see docs/exec.md.
"""

import base64
import json
import random
import secrets
import shlex
import socket
import threading
import time

from pcocc.errors import ExitStatus, PcoccError, TimeoutExpired

DELIMITER = b"\xff"
CHUNK = 512 * 1024  # bytes per guest-file-write / guest-file-read
MAX_REPLY = 64 * 1024 * 1024  # bytes of one reply line from the guest


MAX_SCRIPT = 16 * 1024 * 1024  # bytes of a script given to run_script_argv (one guest-exec input; qemu's JSON token limit is 64 MiB)

# Runs the script given on stdin from a private file in the guest: mktemp -d makes a directory
# of a random name, mode 0700, owned by whoever runs this (root, or the user of 'su'), atomically
# (it never follows a link planted in /tmp); the directory goes when the shell exits.
_SCRIPT_RUNNER = (
    'd=$(mktemp -d "${TMPDIR:-/tmp}/pcocc-script.XXXXXXXXXX") || exit 126; '
    "trap 'rm -rf -- \"$d\"' EXIT; trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM; "
    'cat > "$d/script" && chmod 700 "$d/script" || exit 126; '
)


def run_script_argv(args=(), interpreter="/bin/sh"):
    """argv that runs a script, given as the command's stdin, with args, from a private path in the guest.

    Use: exec(run_script_argv(args), input=script_bytes). Nothing is written
    at a predictable path: the script goes to a new directory of a random name
    (mktemp -d, mode 0700, as the user who runs it), removed when done.
    interpreter: the program that runs the script, or None to execute the
    file itself (its #! line). The script's own stdin is /dev/null; its exit
    status is the command's (126: the private copy could not be made).
    Scripts over MAX_SCRIPT bytes are the caller's to refuse.
    """
    run = f'{shlex.quote(interpreter)} "$d/script"' if interpreter else '"$d/script"'
    return ["/bin/sh", "-c", _SCRIPT_RUNNER + run + ' "$@" < /dev/null', "pcocc-script", *[str(a) for a in args]]


class AgentError(PcoccError):
    """The guest agent could not be reached, or failed a command."""

    status = ExitStatus.EXTERNAL


class AgentTimeout(TimeoutExpired, AgentError):
    """The guest agent did not answer in time (its status is TIMEOUT)."""


class AgentCommandError(AgentError):
    """The guest agent answered a command with an error."""

    def __init__(self, command, error):
        self.command = command
        self.error_class = error.get("class", "GenericError") if isinstance(error, dict) else "GenericError"
        self.desc = error.get("desc", str(error)) if isinstance(error, dict) else str(error)
        super().__init__(f"guest agent: {command} failed: {self.desc}")


class _ConnectionLost(Exception):
    pass


def _request(command, arguments):
    request = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    return json.dumps(request).encode() + b"\n"


class GuestAgent:
    """One connection to a guest agent; methods are thread-safe and reconnect as needed.

    timeout is the default wait, in seconds, for one reply (and for an implicit
    connect).  Every method raises AgentError (AgentTimeout, AgentCommandError).
    """

    def __init__(self, path, timeout=10.0):
        self.path = str(path)
        self.timeout = timeout
        self._sock = None
        self._buf = b""
        self._synced = False
        self._lock = threading.RLock()
        self._handle_high = 0  # the highest guest-file-open handle of this epoch (see handle_epoch)
        self._handle_epoch = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"GuestAgent({self.path!r})"

    # ---- connection -------------------------------------------------------------

    def connect(self, deadline=None, *, timeout=None):
        """Connect and resynchronise, retrying until deadline (a time.monotonic() value).

        timeout=seconds is another way to give the deadline; without either, the
        agent's timeout applies.  Retries while the socket is missing or refuses
        connections (qemu not started yet) and while the agent is silent (the guest
        still booting).  Returns self.
        """
        if deadline is None:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            wait = 0.1  # short first: a sync sent before the guest opened its port is lost
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = "did not answer" if self._sock else "could not be reached"
                    raise AgentTimeout(f"the guest agent at {self.path} {state} in time")
                if self._sock is None:
                    try:
                        self._open(remaining)
                    except OSError:
                        time.sleep(min(0.1, remaining))
                        continue
                try:
                    if self._sync(min(wait, remaining)):
                        self._synced = True
                        return self
                except (_ConnectionLost, OSError):
                    self._drop()
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                wait = min(wait * 1.5, 0.5)

    def close(self):
        with self._lock:
            self._drop()

    @property
    def ready(self):
        """True once connected and synchronised with the guest's agent (read without waiting)."""
        return self._synced

    def _open(self, timeout):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(min(timeout, 5.0))
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._sock, self._buf, self._synced = sock, b"", False

    def _drop(self):
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock, self._buf, self._synced = None, b"", False

    def _sync(self, wait):
        """Send guest-sync-delimited; True when its reply came within wait seconds."""
        sync_id = random.randrange(1, 2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        self._send(DELIMITER + json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + wait
        while True:
            try:
                reply = self._recv(deadline)
            except socket.timeout:
                return False
            except ValueError:
                continue  # a stale, partial line
            if reply.get("return") == sync_id:
                return True

    def _send(self, data):
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise _ConnectionLost(str(e)) from None

    def _recv(self, deadline):
        """The next reply object; raises socket.timeout, ValueError (not a JSON object) or _ConnectionLost."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line, self._buf = self._buf[:end], self._buf[end + 1 :]
                line = line.rsplit(DELIMITER, 1)[-1].strip()  # 0xFF: drop what came before
                if not line:
                    continue
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise ValueError(f"not a JSON object: {line[:80]!r}")
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                raise
            except OSError as e:
                raise _ConnectionLost(str(e)) from None
            if not data:
                raise _ConnectionLost("the guest agent socket was closed")
            self._buf += data
            if len(self._buf) > MAX_REPLY:  # the guest is not to be trusted with our memory
                raise _ConnectionLost(f"the guest agent sent more than {MAX_REPLY} bytes without a line end")

    # ---- commands -----------------------------------------------------------------

    def execute(self, command, arguments=None, timeout=None, reply=True):
        """Run one guest agent command and return its "return" value.

        With reply=False (guest-shutdown and the like answer only on failure), do
        not wait; the next command resynchronises first.
        """
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if not self._synced:
                self.connect(timeout=self.timeout)
            self._send_now(command, _request(command, arguments))
            if not reply:
                self._synced = False
                return None
            return self._answer(command, self._reply(command, timeout))

    def execute_many(self, calls, timeout=None):
        """Runs several commands in one round trip: their requests go in one write, and the
        agent answers them in order (qemu-ga feeds what it reads from its channel to a JSON
        parser that runs each complete request in turn: qga/main.c channel_event_cb).

        calls: [(command, arguments or None)]. Returns, in their order, each command's
        "return" value, or the AgentCommandError it answered (returned, not raised: every
        request ran whatever the ones before it answered). Raises AgentError (AgentTimeout)
        when the connection failed or a reply did not come: then which of them ran is unknown.
        """
        timeout = self.timeout if timeout is None else timeout
        if not calls:
            return []
        with self._lock:
            if not self._synced:
                self.connect(timeout=self.timeout)
            self._send_now(calls[0][0], b"".join(_request(c, a) for c, a in calls))
            results = []
            for command, _ in calls:
                try:
                    results.append(self._answer(command, self._reply(command, timeout)))
                except AgentCommandError as exc:
                    results.append(exc)
            return results

    @property
    def handle_epoch(self):
        """Changes whenever guest-file-open gives a handle number not above every number seen
        before: the agent's counter started again (a guest rebooted with the agent's state
        file in a tmpfs; qga/main.c ga_get_fd_handle numbers handles from a counter kept in
        that file, from 1000). A handle opened in an epoch that is still current names what
        it was opened on, or nothing (an agent restarted since does not know it): see
        SpareRunner."""
        return self._handle_epoch

    def _send_now(self, command, data):
        try:
            self._send(data)
        except _ConnectionLost as e:
            self._drop()
            raise AgentError(f"guest agent: connection lost during {command}: {e}") from None

    def _reply(self, command, timeout):
        try:
            return self._recv(time.monotonic() + timeout)
        except socket.timeout:
            self._synced = False  # its reply may still come: resync before the next command
            raise AgentTimeout(f"guest agent: no reply to {command} within {timeout:g} s") from None
        except _ConnectionLost as e:
            self._drop()
            raise AgentError(f"guest agent: connection lost during {command}: {e}") from None
        except ValueError as e:
            self._synced = False
            raise AgentError(f"guest agent: bad reply to {command}: {e}") from None

    def _answer(self, command, answer):
        if "error" in answer:
            raise AgentCommandError(command, answer["error"])
        if "return" not in answer:
            self._synced = False
            raise AgentError(f"guest agent: unexpected reply to {command}: {answer!r:.200}")
        value = answer["return"]
        if command == "guest-file-open" and isinstance(value, int):
            if value <= self._handle_high:
                self._handle_epoch += 1
            self._handle_high = value
        return value

    def ping(self, timeout=None):
        self.execute("guest-ping", timeout=timeout)

    def info(self):
        """guest-info: the agent's version and supported commands."""
        return self.execute("guest-info")

    def exec(self, argv, input=None, env=None, timeout=60.0):
        """Run argv in the guest (searched in the agent's PATH); (exit code, stdout, stderr).

        input: bytes or str for its stdin; env: a dict that replaces its environment.
        A process killed by signal N gives -N.  After timeout seconds the process is
        killed (kill -9 in the guest) and AgentTimeout raised.
        """
        argv = [str(a) for a in argv]
        if not argv:
            raise AgentError("guest agent: exec of an empty command")
        args = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if env is not None:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        if input is not None:
            data = input.encode() if isinstance(input, str) else bytes(input)
            args["input-data"] = base64.b64encode(data).decode()
        pid = self.execute("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = self.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill(pid)
                raise AgentTimeout(f"guest agent: {' '.join(argv)[:100]} still running after {timeout:g} s: killed")
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.5)
        try:  # what the guest says is checked like any outside input
            code = status.get("exitcode")
            code = int(code) if code is not None else (-int(status.get("signal", 0)) or -1)
            out = base64.b64decode(status.get("out-data", ""), validate=True)
            err = base64.b64decode(status.get("err-data", ""), validate=True)
        except (TypeError, ValueError) as exc:
            raise AgentError(f"guest agent: a malformed reply to {' '.join(argv)[:100]}: {exc}") from None
        return code, out, err

    def _kill(self, pid):
        try:
            self.execute("guest-exec", {"path": "kill", "arg": ["-KILL", str(pid)]})
        except AgentError:
            pass

    def write_file(self, path, data, mode=None):
        """Write data (bytes or str) to path in the guest; chmod it to mode (an int) if given."""
        data = data.encode() if isinstance(data, str) else bytes(data)
        handle = self.execute("guest-file-open", {"path": path, "mode": "wb"})
        try:
            for start in range(0, len(data), CHUNK):
                chunk = data[start : start + CHUNK]
                written = self.execute("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()})
                if written.get("count") != len(chunk):
                    raise AgentError(f"guest agent: short write to {path} ({written.get('count')} of {len(chunk)} bytes)")
        finally:
            self._close_handle(handle)
        if mode is not None:
            code, _, err = self.exec(["chmod", f"{mode:o}", path])
            if code != 0:
                raise AgentError(f"guest agent: chmod {mode:o} {path} failed: {err.decode(errors='replace').strip()}")

    def read_file(self, path):
        """The content of path in the guest, as bytes."""
        handle = self.execute("guest-file-open", {"path": path, "mode": "rb"})
        parts = []
        try:
            while True:
                got = self.execute("guest-file-read", {"handle": handle, "count": CHUNK})
                parts.append(base64.b64decode(got.get("buf-b64", "")))
                if got.get("eof") or not got.get("count"):
                    break
        finally:
            self._close_handle(handle)
        return b"".join(parts)

    def _close_handle(self, handle):
        try:
            self.execute("guest-file-close", {"handle": handle})
        except AgentError:
            pass  # the agent drops its handles when it restarts; the first error matters more

    def fsfreeze(self, timeout=None):
        """Freeze the guest's file systems; the number frozen."""
        return self.execute("guest-fsfreeze-freeze", timeout=timeout if timeout is not None else max(self.timeout, 30))

    def fsthaw(self, timeout=None):
        """Thaw the guest's file systems; the number thawed."""
        return self.execute("guest-fsfreeze-thaw", timeout=timeout if timeout is not None else max(self.timeout, 30))

    def fsfreeze_status(self):
        """"thawed" or "frozen"."""
        return self.execute("guest-fsfreeze-status")

    def shutdown(self, mode="powerdown"):
        """Ask the guest to shut down (mode: powerdown, halt or reboot); does not wait."""
        self.execute("guest-shutdown", {"mode": mode}, reply=False)


# ---- streamed exec -----------------------------------------------------------------------------
# The design (docs/exec.md): guest-exec runs RUNNER under setsid (so the command's processes form
# one session and process group, which the host kills with one `kill -KILL -PID`), with the
# command's stdout and stderr piped into two relays, each a `dd` loop that writes the stream into
# numbered segment files of a private directory (dd writes each read at once, and counts reads,
# full or not: reads of at most 8 KiB bound a segment to EXEC_SEGMENT bytes, and a command that
# writes 8 KiB or more at a time fills them). The host reads each segment as it grows with
# guest-file-read (regular files: a read at the end returns what is there, with eof true, and
# the next read returns what came since) and moves to segment k+1 once it exists (the relay
# created it: segment k is complete). A relay that writes segment k waits first until the host
# acknowledged segment k-2 (a line in a FIFO that the host holds open read-write, so that neither
# side's open blocks), and then empties it: the guest holds at most two segments per stream, and
# a fast writer blocks on its pipe rather than filling the guest's memory. qemu-ga cannot read a
# FIFO: its guest-file-read is an fread() of `count` bytes on a non-blocking descriptor, which fails
# with EAGAIN (losing what it read) whenever less than `count` bytes are waiting. Its writes are
# fwrite()s: a line for the relay or the feeder is followed by a guest-file-flush.
# stdin goes the other way: the host writes segment files (at most two ahead) and names each in
# the FIFO .in; a feeder `cat`s them, in order, into the command's stdin and empties each. The
# feeder runs outside the command's job (the runner does not wait for it: a command that ends
# without reading its stdin ends the exec, as with ssh) and ends when the host closes the FIFO;
# its descriptors are set with exec in a subshell: a redirection on a function call would make
# dash keep a copy of the runner's stderr, whose end qemu-ga waits for before it says "exited".
# Only POSIX sh, dd with status=none (coreutils >= 8.20), cat, mkdir, mkfifo (coreutils) and setsid (util-linux) are
# needed in the guest: any stock cloud image has them. Every exec() costs 0.06-0.3 s under TCG, so
# each VM keeps a runner started ahead (SpareRunner): its setsid, sh, FIFOs and relays run before
# the command comes, in a line of its FIFO .c, and a `sh -c LINE` runs in a subshell of the runner
# (as a function, so that the shell's messages read as sh -c's). A runner started for one exec
# (none ahead) makes each FIFO when it is first needed, after the command started. The command runs
# in the foreground (an asynchronous list would start it with SIGINT and SIGQUIT ignored), and a
# watcher kills the group on a line in the FIFO .k: no exec() in the guest for a Ctrl-C.
EXEC_SEGMENT = 4 * 1024 * 1024  # bytes at most per output segment: dd reads of at most 8 KiB, EXEC_SEGMENT / 8 KiB reads
EXEC_READ = 1024 * 1024  # bytes asked by one guest-file-read of output (qemu-ga's cap is 48 MiB)
STDIN_SEGMENT = 1024 * 1024  # bytes of stdin per segment file; two segments at most in the guest
PROBE_INTERVAL = 0.5  # seconds between two looks for the next segment of a stream with nothing new
EXEC_TMP = "/tmp"  # where each VM's private exec directory is made (mode 0700, a random name)
SPARE_LINE = 3000  # bytes at most of a command passed in a spare runner's go line (else through a file)
CLAIM_FIRST = 0.5  # seconds before the first look at a spare started ahead (its start-up: 0.5-2.5 s under TCG)
CLAIM_EVERY = 0.2  # seconds between two looks after that, while no exec waits for it

_EXEC_RUNNER = r'''B=$1 P=$1/$2 N=$3 W=$4 IN=$5 SH=$6; shift 6
umask 077
[ -d "$B" ] || mkdir -m 700 -- "$B" 2>/dev/null  # then checked: a directory planted meanwhile is not ours
if [ -L "$B" ] || ! [ -d "$B" ] || ! [ -O "$B" ]; then echo "pcocc-exec: error: ${B%/*} holds a directory of another user in its place" >&2; exit 124; fi
{ : > "$P.o.0" && : > "$P.e.0" && : > "$P.st"; } 2>/dev/null || { echo "pcocc-exec: error: cannot create files in ${B%/*} (full or read-only?)" >&2; exit 124; }
fifo() { [ -p "$1" ] || mkfifo "$1" 2>/dev/null || [ -p "$1" ]; }
if [ "$W" = 1 ]; then  # started ahead: the host's go line in $P.c names the command (or $P.a holds it)
  mkfifo "$P.k" "$P.c" 2>/dev/null || { echo "pcocc-exec: error: mkfifo failed in ${B%/*}" >&2; exit 124; }
fi
# a line in $P.k kills the whole process group (the session setsid made): no exec() in the kill path
( exec </dev/null >/dev/null 2>&1; fifo "$P.k" && read -r _ < "$P.k" && kill -KILL 0 ) &
w=$!
relay() {
  i=0
  while :; do
    dd bs=8192 count="$N" status=none > "$P.$1.$i" || return 1
    [ -s "$P.$1.$i" ] || return 0
    i=$((i + 1))
    : > "$P.$1.$i"
    if [ "$i" -ge 2 ]; then
      fifo "$P.$1.ack" && read -r _ < "$P.$1.ack" || return 1
      : > "$P.$1.$((i - 2))"
    fi
  done
}
feed() {
  fifo "$P.in" && exec 6< "$P.in" || return 1
  k=0
  while read -r m <&6 && [ "$m" = "$k" ]; do
    cat -- "$P.i.$k" || return 1
    : > "$P.i.$k"
    k=$((k + 1))
  done
}
cmd() {
  if [ "$SH" = 1 ]; then
    # a function made of the line, run in a subshell: what sh says about the command reads as
    # sh -c's (eval would name itself); a line that does not parse so goes to sh -c itself
    (exec 2>&3 3>&- 4>&-; pcocc_cmd=$1; unset -f fifo relay feed cmd run; unset B P N W IN SH A w go words; set --
     if command eval "pcocc_cmd() { unset -f pcocc_cmd; $pcocc_cmd
}" 2>/dev/null; then unset pcocc_cmd; pcocc_cmd; else exec sh -c "$pcocc_cmd" sh; fi)
  else
    "$@" 2>&3 3>&- 4>&-
  fi
}
run() {
  if [ "$W" = 1 ]; then
    # "go IN SH" then the command's words, quoted for sh, on one line, or "go IN SH file": in $P.a
    { read -r go IN SH A && read -r words; } < "$P.c" && [ "$go" = go ] || { echo "pcocc-exec: error: no command came" >&2; return 1; }
    if [ "$A" = file ]; then . "$P.a"; else eval "set -- $words"; fi
  fi
  umask 022  # the runner's files are private (077); the command's get the usual default
  # the command runs in the foreground of its shells, never as an asynchronous list, which would
  # start it with SIGINT and SIGQUIT ignored (POSIX sh, "Signals"); only the feeder is one
  if [ "$IN" = 1 ]; then
    { (exec 2>/dev/null 3>&- 4>&- && feed) & } | cmd "$@"
  else
    cmd "$@"
  fi
  echo $? >&4
}
{ { run "$@" | relay o 3>&- 4>&-; } 3>&1 | relay e 4>&-; } 4>"$P.st" < /dev/null
kill "$w" 2>/dev/null
read -r st < "$P.st" && [ -n "$st" ] && exit "$st"
exit 125
'''


class _Segments:
    """The host's side of one output stream: the segment it reads, and the acks it owes."""

    def __init__(self, prefix):
        self.prefix = prefix  # path of the stream's segments in the guest, without the number
        self.k = 0
        self.handle = None
        self.acks = 0  # segments read whole and not yet acknowledged
        self.ack_handle = None
        self.fresh = False  # data came since the last look for segment k+1
        self.probed = 0.0  # time.monotonic() of that look


class ExecResult:
    """How a streamed command ended: status (0-255: its exit status, 128+N: killed by signal N,
    as sh reports it), killed (True when StreamingExec.kill ended it) and diagnostic (what the
    runner itself said on stderr, e.g. a guest without mkfifo)."""

    def __init__(self, status, killed=False, diagnostic=""):
        self.status = status
        self.killed = killed
        self.diagnostic = diagnostic

    def __repr__(self):
        return f"ExecResult(status={self.status}, killed={self.killed})"


class StreamingExec:
    """One command run in the guest with its stdout and stderr read as they are written.

    agent: a GuestAgent (only its execute() is used); argv: the command (searched in the
    guest's PATH); base: the private directory of this VM's execs in the guest (see
    new_exec_base; made by the first exec, and again after a guest reboot); stdin: True
    to feed the command's stdin with write_stdin/close_stdin, else it reads /dev/null.

    Use: start(), then poll() until it returns with .result set; write_stdin() while
    stdin_room() > 0; kill() to end it (SIGKILL to its whole process group); cleanup()
    last.  Every method raises AgentError (AgentTimeout, AgentCommandError).  The
    protocol in the guest is in docs/exec.md; qemu-ga commands per the QAPI schema
    qga/qapi-schema.json (guest-exec, guest-exec-status, guest-file-open/read/write/close).
    """

    def __init__(self, agent, argv, base, *, stdin=False, segment=EXEC_SEGMENT,
                 read_size=EXEC_READ, stdin_segment=STDIN_SEGMENT, spare=None, reset_signals=False):
        self.agent = agent
        self.argv = [str(a) for a in argv]
        if not self.argv:
            raise AgentError("guest agent: exec of an empty command")
        # sh -c LINE runs in a subshell of the runner itself (eval): one exec less before the
        # first line, and the same shell (the guest's sh, with no pcocc variable or function left)
        self.shell = len(self.argv) == 3 and self.argv[0] in ("sh", "/bin/sh") and self.argv[1] == "-c"
        self.spare = spare if spare is not None and spare.base == base and spare.usable() else None
        self.base = base
        self.stdin = stdin
        self.segment = int(segment)
        self.read_size = int(read_size)
        self.stdin_segment = int(stdin_segment)
        self.pid = None
        self.result = None
        self.killed = False
        self._quiet = True  # the last round brought nothing: the next one asks for the status too
        self._ctl = None  # the spare's .c FIFO, once the command went there
        self._runner(self.spare.id if self.spare else secrets.token_hex(8))
        self._in = b""  # stdin accepted, not yet in the guest
        self._in_k = 0  # next stdin segment number
        self._in_consumed = 0  # stdin segments known to be emptied by the feeder
        self._in_eof = False  # close_stdin called
        self._in_eof_sent = False
        self._in_handle = None  # the .in FIFO, opened read-write
        self._kill_handle = self.spare.handles["k"] if self.spare else None  # the .k FIFO, opened read-write
        if self.spare:
            self._streams["out"].handle, self._streams["err"].handle = self.spare.handles["o"], self.spare.handles["e"]
        self.reset_signals = reset_signals  # start through env --default-signal (see _runner_args)

    def _runner(self, exec_id):
        self.id = exec_id
        self.prefix = f"{self.base}/{exec_id}"
        self._streams = {"out": _Segments(f"{self.prefix}.o"), "err": _Segments(f"{self.prefix}.e")}

    # ---- life ---------------------------------------------------------------------------

    def start(self):
        """Starts the command in the guest; returns self.

        With a claimed SpareRunner (see SpareRunner.claim): the command goes in a line of its
        control FIFO, with no exec() in the guest: one round trip (its status, then the line
        and its flush), after three more for a command of several lines or over SPARE_LINE
        bytes, which goes through a file. A spare found ended, or whose handles the agent no
        longer knows, got nothing: the command then starts as without one. Else one
        guest-exec starts a new runner with the command.
        """
        words = self.argv[2:] if self.shell else self.argv
        flags = ["1" if self.stdin else "0", "1" if self.shell else "0"]
        if self.spare is not None and self._start_in_spare(words, flags):
            return self
        args = _runner_args(self.base, self.id, self.segment, wait=False, reset_signals=self.reset_signals)
        args["arg"] += flags + words
        self.pid = self.agent.execute("guest-exec", args)["pid"]
        for seg in self._streams.values():
            seg.probed = time.monotonic()  # its first segments are not complete yet: no look for the next
        return self

    def _start_in_spare(self, words, flags):
        """Gives the command to the spare; False (the spare discarded) when it got nothing."""
        spare = self.spare
        quoted = shlex.join(words)
        if "\n" in quoted or len(quoted) > SPARE_LINE:  # a FIFO write is atomic up to PIPE_BUF (4 KiB)
            self._write_file(f"{self.prefix}.a", f"set -- {quoted}\n".encode())
            line = f"go {' '.join(flags)} file\n\n"
        else:
            line = f"go {' '.join(flags)} -\n{quoted}\n"
        # the status is answered before the line is written: a runner that had ended could not read it
        status, wrote, flushed = execute_many(self.agent, [
            ("guest-exec-status", {"pid": spare.pid}),
            ("guest-file-write", {"handle": spare.ctl, "buf-b64": base64.b64encode(line.encode()).decode()}),
            ("guest-file-flush", {"handle": spare.ctl})])
        ran = not isinstance(status, Exception) and not status.get("exited")
        if isinstance(wrote, Exception) or (not ran and not isinstance(status, Exception)):
            # nothing written (an agent that restarted does not know the handle), or written to a
            # runner that had ended: the command did not start; it starts as without a spare
            spare.discard()
            self.spare, self._kill_handle = None, None
            self._runner(secrets.token_hex(8))
            return False
        self.pid, self._ctl = spare.pid, spare.ctl
        spare.release()  # its handles are this exec's now: cleanup() closes them
        if isinstance(status, Exception):  # the line was written, to a runner the agent does not know
            raise AgentError("guest agent: the command's runner is no longer known to the guest agent")
        if isinstance(flushed, Exception) or wrote.get("count") != len(line.encode()):
            raise AgentError("guest agent: the command's runner stopped reading its FIFO")
        for seg in self._streams.values():
            seg.probed = time.monotonic()
        return True

    def poll(self):
        """One round of reads: [(\"out\"|\"err\", bytes)] that came since the last round.

        When the command has ended and everything it wrote was read, sets .result
        (an ExecResult).  A round with nothing new is the caller's cue to wait a little.
        A round is one round trip to the agent (more when a segment ends, or a stream has
        more than one read): both streams' reads, a look for a stream's next segment when
        due, and after a quiet round the command's status.
        """
        chunks = []
        if self.killed:  # once killed, only its end matters: one call a round, not three
            status = self.agent.execute("guest-exec-status", {"pid": self.pid})
            if status.get("exited"):
                self._end(status, chunks)
            return chunks
        calls, plan = [], []
        for name, seg in self._streams.items():
            if seg.handle is None:  # a runner started for this exec makes its files once it runs
                calls.append(("guest-file-open", {"path": f"{seg.prefix}.{seg.k}", "mode": "r"}))
                plan.append((name, "open"))
                continue
            calls.append(("guest-file-read", {"handle": seg.handle, "count": self.read_size}))
            plan.append((name, "read"))
            if seg.fresh or time.monotonic() - seg.probed >= PROBE_INTERVAL:
                # the relay moves to segment k+1 only after writing to k: no need to look each round
                seg.fresh, seg.probed = False, time.monotonic()
                calls.append(("guest-file-open", {"path": f"{seg.prefix}.{seg.k + 1}", "mode": "r"}))
                plan.append((name, seg.k + 1))
        if self._quiet:
            calls.append(("guest-exec-status", {"pid": self.pid}))
        replies = execute_many(self.agent, calls)
        status = replies[-1] if self._quiet else None
        error = status if isinstance(status, Exception) else None
        got = {}
        for (name, what), reply in zip(plan, replies):
            seg = self._streams[name]
            if error is not None:  # a call of this round failed: what the others opened is kept
                if not isinstance(reply, Exception) and what == "open":  # (cleanup closes it)
                    seg.handle = reply
                elif not isinstance(reply, Exception) and what != "read":
                    self._close(reply)  # a next segment's handle: closed, never lost
                continue
            try:
                if what == "open":
                    if not isinstance(reply, Exception):
                        seg.handle, seg.probed = reply, time.monotonic()
                        got[name] = self._read_stream(seg)
                elif what == "read":
                    if isinstance(reply, Exception):
                        error = reply
                        continue
                    got[name] = self._decode(reply)
                    seg.fresh = seg.fresh or bool(got[name])
                    if len(got[name]) == self.read_size and (name, seg.k + 1) not in plan:  # more is waiting
                        got[name] += self._read_stream(seg)
                elif isinstance(reply, Exception):
                    pass  # segment `what` is not there yet
                elif what != seg.k + 1:  # moved there already (a read of more)
                    self._close(reply)
                else:  # segment k+1 exists: the relay finished k (drained first), and the stream moves on
                    got[name] = got.get(name, b"") + self._next_segment(seg, reply) + self._read_stream(seg)
            except AgentError as exc:  # a read made here failed: the rest of the round is still handled
                error = exc
        if error is not None:
            raise error
        for name in self._streams:
            if got.get(name):
                chunks.append((name, got[name]))
        self._send_acks()
        if self.stdin:
            self._flush_stdin()
        if status is not None and status.get("exited"):
            self._end(status, chunks)
        self._quiet = not chunks
        return chunks

    def _end(self, status, chunks):
        for name, seg in self._streams.items():  # every segment is final now
            data = self._read_stream(seg, final=True)
            if data:
                chunks.append((name, data))
        self.result = self._result(status)

    def kill(self):
        """SIGKILL to the command's process group (the runner's session: every process it
        started that did not leave it); the next polls see the end.

        The runner's watcher does it on a line in its .k FIFO (two agent round trips, no
        exec() in the guest); `kill -KILL -PID` through guest-exec when that FIFO is not
        there yet (a runner just started)."""
        self.killed = True
        if self.pid is None or self.result is not None:
            return
        try:
            if self._kill_handle is None:
                self._kill_handle = self._open(f"{self.prefix}.k", "r+")
            if self._kill_handle is not None and self._write_to(self._kill_handle, b"kill\n") == 5:
                return
        except AgentError:
            pass  # the runner is gone or stuck: the agent kills the group itself
        self.agent.execute("guest-exec", {"path": "sh", "arg": ["-c", f"kill -KILL -{int(self.pid)} 2>/dev/null"]})

    def cleanup(self):
        """Closes the host's handles and removes the command's files in the guest (does not wait)."""
        if self.pid is None and self.spare is not None:
            self.spare.discard()  # never started: the spare still waits
            return
        handles = [h for seg in self._streams.values() for h in (seg.handle, seg.ack_handle)]
        handles += [self._in_handle, self._kill_handle, self._ctl]
        try:
            execute_many(self.agent, [("guest-file-close", {"handle": h}) for h in handles if h is not None])
        except AgentError:
            pass
        for seg in self._streams.values():
            seg.handle = seg.ack_handle = None
        self._kill_handle = self._ctl = None
        if self.stdin and self._in_handle is None and not self.killed and self._fifo():
            self._close(self._in_handle)  # a feeder waiting for a writer gets one, then the end
        self._in_handle = None
        self.agent.execute("guest-exec", {"path": "sh", "arg": ["-c", 'rm -f -- "$0".*', self.prefix]})

    # ---- stdin ------------------------------------------------------------------------------

    @property
    def stdin_queued(self):
        """Bytes of stdin accepted and not yet in the guest."""
        return len(self._in)

    @property
    def stdin_closed(self):
        return self._in_eof

    def stdin_room(self):
        """Bytes write_stdin may take now without holding more than two segments on the host."""
        if not self.stdin or self._in_eof:
            return 0
        return max(0, 2 * self.stdin_segment - len(self._in))

    def write_stdin(self, data):
        """Queues bytes for the command's stdin (sent to the guest by the next polls)."""
        if not self.stdin or self._in_eof:
            raise AgentError("guest agent: this command's stdin is closed")
        self._in += bytes(data)
        self._flush_stdin()

    def close_stdin(self):
        """The end of the command's stdin, once what is queued arrived."""
        if self.stdin:
            self._in_eof = True
            self._flush_stdin()

    def _flush_stdin(self):
        while self._in and self.result is None:
            if self._in_k - self._in_consumed >= 2 and not self._stdin_consumed():
                return  # the feeder has not emptied segment k-2 yet
            if not self._fifo():
                return
            chunk, self._in = self._in[: self.stdin_segment], self._in[self.stdin_segment:]
            self._write_file(f"{self.prefix}.i.{self._in_k}", chunk)
            self._fifo_write(f"{self._in_k}\n".encode())
            self._in_k += 1
        if self._in_eof and not self._in and not self._in_eof_sent and self.result is None and self._fifo():
            self._fifo_write(b"eof\n")
            self._in_eof_sent = True

    def _stdin_consumed(self):
        """True (and the count advanced) once the feeder emptied the oldest stdin segment in flight."""
        path = f"{self.prefix}.i.{self._in_consumed}"
        try:
            handle = self.agent.execute("guest-file-open", {"path": path, "mode": "r"})
        except AgentCommandError:
            return False
        try:
            got = self.agent.execute("guest-file-read", {"handle": handle, "count": 1})
        finally:
            self.agent.execute("guest-file-close", {"handle": handle})
        if got.get("count"):
            return False
        self._in_consumed += 1
        return True

    def _fifo(self):
        if self._in_handle is None:
            try:  # read-write: never blocks, and the feeder's open for reading does not either
                self._in_handle = self.agent.execute("guest-file-open", {"path": f"{self.prefix}.in", "mode": "r+"})
            except AgentCommandError:
                return False  # not made yet
        return True

    def _fifo_write(self, data):
        if self._write_to(self._in_handle, data) != len(data):
            raise AgentError("guest agent: the command's runner stopped reading its FIFO")

    def _write_to(self, handle, data):
        """A line to a FIFO of the runner, opened read-write (so never blocking); the write
        and its flush (qemu-ga writes through stdio) in one round trip. The count written."""
        done, flushed = execute_many(self.agent, [
            ("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()}),
            ("guest-file-flush", {"handle": handle})])
        for reply in (done, flushed):
            if isinstance(reply, Exception):
                raise reply
        return int(done.get("count") or 0)

    def _write_file(self, path, data):
        handle = self.agent.execute("guest-file-open", {"path": path, "mode": "w"})
        try:
            for start in range(0, len(data), CHUNK):
                chunk = data[start:start + CHUNK]
                done = self.agent.execute("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()})
                if done.get("count") != len(chunk):
                    raise AgentError(f"guest agent: short write to {path} ({done.get('count')} of {len(chunk)} bytes)")
        finally:
            self.agent.execute("guest-file-close", {"handle": handle})

    # ---- output -----------------------------------------------------------------------------

    def _open(self, path, mode="r"):
        try:
            return self.agent.execute("guest-file-open", {"path": path, "mode": mode})
        except AgentCommandError:
            return None  # not there (yet)

    def _read_stream(self, seg, final=False):
        """What the stream's segments hold past what was read; with final, all of it."""
        parts = []
        while True:
            if seg.handle is None:
                seg.handle = self._open(f"{seg.prefix}.{seg.k}")
                if seg.handle is None:
                    break
            got = self._read(seg.handle)
            parts.append(got)
            if len(got) == self.read_size and not final and sum(map(len, parts)) < 4 * self.read_size:
                continue  # more is waiting, but let the other stream and stdin have their turn
            if len(got) == self.read_size:
                continue
            seg.fresh = seg.fresh or bool(got)
            if not final and not seg.fresh and time.monotonic() - seg.probed < PROBE_INTERVAL:
                break  # the relay moves to segment k+1 only after writing to k: no need to look each round
            seg.fresh, seg.probed = False, time.monotonic()
            nxt = self._open(f"{seg.prefix}.{seg.k + 1}")
            if nxt is None:
                break
            parts.append(self._next_segment(seg, nxt))
        return b"".join(parts)

    def _next_segment(self, seg, nxt):
        """Segment k+1 exists (handle nxt): the relay finished k, whose end we may not have
        read yet. What is left of k; seg moves to k+1."""
        parts = []
        try:
            while len(last := self._read(seg.handle)) > 0:
                parts.append(last)
        except AgentError:
            self._close(nxt)  # not the stream's yet: cleanup() would not know it
            raise
        self._close(seg.handle)
        seg.handle, seg.k, seg.acks = nxt, seg.k + 1, seg.acks + 1
        return b"".join(parts)

    def _read(self, handle):
        return self._decode(self.agent.execute("guest-file-read", {"handle": handle, "count": self.read_size}))

    @staticmethod
    def _decode(got):
        try:
            return base64.b64decode(got.get("buf-b64", ""), validate=True)
        except (TypeError, ValueError, AttributeError) as exc:
            raise AgentError(f"guest agent: a malformed guest-file-read reply: {exc}") from None

    def _close(self, handle):
        try:
            self.agent.execute("guest-file-close", {"handle": handle})
        except AgentError:
            pass

    def _send_acks(self):
        for seg in self._streams.values():
            if not seg.acks or self.result is not None:
                continue
            if seg.ack_handle is None:
                seg.ack_handle = self._open(f"{seg.prefix}.ack", "r+")
                if seg.ack_handle is None:
                    continue  # the runner makes it just after starting the command
            # qemu-ga's guest-file-write is an fwrite(): the bytes stay in its stdio buffer until a flush
            seg.acks -= self._write_to(seg.ack_handle, b"\n" * seg.acks)

    def _result(self, status):
        try:
            err = base64.b64decode(status.get("err-data", ""), validate=True).decode(errors="replace").strip()
            if status.get("exitcode") is not None:
                code = int(status["exitcode"])
            else:
                code = 128 + int(status.get("signal", 9))
        except (TypeError, ValueError) as exc:
            raise AgentError(f"guest agent: a malformed guest-exec-status reply: {exc}") from None
        if self.killed:
            return ExecResult(code, killed=True, diagnostic=err)
        if code in (124, 125) and err:  # the runner's own failure (the command's stderr goes to the relays)
            raise AgentError(runner_error(err, code))
        return ExecResult(code, diagnostic=err)


def runner_error(stderr, status):
    """One line for a person, from what a failed exec runner said on stderr (status 124: it
    could not set up, 125: the command's status was lost).  The runner's own reasons are its
    lines "pcocc-exec: error: REASON"; anything else (a shell's message naming the runner's
    internals) is not shown: the line says what failed and where to look."""
    reasons = [line.split("pcocc-exec: error:", 1)[1].strip() for line in stderr.splitlines() if "pcocc-exec: error:" in line]
    if reasons:
        return f"cannot run the command in the guest: {reasons[-1][:200]}"
    if status == 124:
        return "cannot run the command in the guest: its exec runner could not start (is /tmp writable, mkfifo installed?)"
    return "the command's exit status was lost in the guest (its runner was killed, or /tmp is full)"


def _runner_args(base, exec_id, segment, wait, reset_signals=False):
    """guest-exec's arguments that start the exec runner (then come, without wait, the flags
    and the command).  $0 is "sh": what the guest's shell says about the command reads as sh -c's.

    reset_signals: start it through `env --default-signal=INT,QUIT` (see signals_to_reset): a
    signal ignored when a shell starts stays ignored in all it runs (POSIX), and qemu-ga may have
    been started with SIGQUIT ignored (the tiny image's init starts it as a background job),
    which would pass to every command.
    """
    head = ["setsid", "sh", "-c", _EXEC_RUNNER, "sh", base, exec_id, str(max(1, int(segment) // 8192))]
    head += ["1", "0", "0"] if wait else ["0"]  # a spare's flags come with its go line
    if reset_signals:
        head = ["env", "--default-signal=INT,QUIT"] + head
    return {"path": head[0], "arg": head[1:], "capture-output": True}


def signals_to_reset(agent):
    """True when the agent's children start with SIGINT or SIGQUIT ignored (seen: a qemu-ga
    started as a background job, by the tiny image's init) and the guest's env(1) can reset
    them (--default-signal: GNU coreutils 8.31 or later; busybox's cannot).  One guest-exec,
    a fraction of a second under emulation.  Raises AgentError."""
    probe = 'sed -n "s/^SigIgn:[[:space:]]*//p" /proc/$$/status; env --default-signal=INT,QUIT true 2>/dev/null && echo reset'
    code, out, _ = agent_run(agent, ["sh", "-c", probe])
    words = out.decode(errors="replace").split()
    try:
        ignored = int(words[0], 16) & 0b110  # the bits of SIGINT (2) and SIGQUIT (3)
    except (IndexError, ValueError):
        return False
    return bool(ignored) and "reset" in words


def agent_run(agent, argv, timeout=30):
    """(exit code, stdout, stderr) of argv run to its end through agent.execute alone
    (guest-exec with its output captured, then guest-exec-status).  Raises AgentError."""
    pid = agent.execute("guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True})["pid"]
    deadline, delay = time.monotonic() + timeout, 0.01
    while True:
        status = agent.execute("guest-exec-status", {"pid": pid})
        if status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise AgentTimeout(f"guest agent: {' '.join(argv)[:60]} did not end within {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    try:
        return (status.get("exitcode"), base64.b64decode(status.get("out-data", ""), validate=True),
                base64.b64decode(status.get("err-data", ""), validate=True))
    except (TypeError, ValueError) as exc:
        raise AgentError(f"guest agent: a malformed guest-exec-status reply: {exc}") from None


class SpareRunner:
    """An exec runner started ahead in the guest, waiting for its command (docs/exec.md, Latency).

    Its setsid, sh, FIFOs, watcher and both relays (dd) are already running when an exec
    comes, so that a command starts with no exec() in the guest before it: the costliest part
    of the first line under emulation (0.4-0.7 s of the 0.7 s measured cold on an idle host,
    more under load).  start() runs one guest-exec (raises AgentError); claim(), run ahead
    too, waits until it listens and opens what the exec will use (its .c FIFO, for the go
    line; .o.0 and .e.0, its first output; .k, for a Ctrl-C), so that the exec itself only
    writes its go line and reads; discard() kills an unused one.  One StreamingExec takes it
    (spare=...), which checks in the same round trip as the go line that it still runs.

    Its handles stay open in the agent until the exec comes: they are used only while the
    agent's handle_epoch is the one they were opened in (a rebooted guest's new agent may
    number handles from 1000 again, and give ours to other files: see GuestAgent.handle_epoch);
    within one epoch a handle number is never given twice, so an agent that restarted does
    not know ours, and a write to them fails with nothing written.
    """

    def __init__(self, agent, base, segment=EXEC_SEGMENT, reset_signals=False):
        self.agent = agent
        self.base = base
        self.reset_signals = reset_signals
        self.id = secrets.token_hex(8)
        self.prefix = f"{base}/{self.id}"
        self.segment = segment
        self.pid = None
        self.ctl = None  # the handle of its .c FIFO, read-write, once claimed
        self.handles = {}  # once claimed: {"o": .o.0, "e": .e.0 (read), "k": .k (read-write)}
        self.epoch = None  # the agent's handle_epoch they were opened in

    def start(self):
        self.pid = self.agent.execute("guest-exec", _runner_args(self.base, self.id, self.segment, wait=True,
                                                                 reset_signals=self.reset_signals))["pid"]
        return self

    def claim(self, timeout, hurry=None):
        """True once the runner waits for its command and its handles are open (see the
        class); False when it ended (a guest rebooted, a qemu-ga restarted) or did not get
        there in timeout seconds (a guest without mkfifo). Never raises: a spare that fails
        is a cold start.  With hurry (a threading.Event), it runs ahead, beside a command
        that needs the guest's CPU (each look costs the guest some): it looks first after
        CLAIM_FIRST, then every CLAIM_EVERY, and every 20 ms at most once hurry is set (an
        exec waits for it); without hurry, every 20 ms at most."""
        deadline = time.monotonic() + timeout
        epoch = handle_epoch(self.agent)
        delay = 0.005
        if hurry is not None and not hurry.is_set():
            hurry.wait(CLAIM_FIRST)  # its start takes longer: no look before (each costs the guest some CPU)
        try:
            while True:
                status, ctl = execute_many(self.agent, [("guest-exec-status", {"pid": self.pid}),
                                                        ("guest-file-open", {"path": f"{self.prefix}.c", "mode": "r+"})])
                if isinstance(ctl, int) and (isinstance(status, Exception) or status.get("exited")):
                    self._close([ctl])
                if isinstance(status, Exception) or status.get("exited"):
                    return False  # a pid this agent does not know: it restarted, or the guest rebooted
                if isinstance(ctl, int):
                    break
                if time.monotonic() + delay > deadline:
                    return False
                hurried = hurry is None or hurry.is_set()
                if hurried:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
                else:
                    hurry.wait(CLAIM_EVERY)
            # made before .c by the runner: its first segments, and the FIFO of a Ctrl-C
            opened = execute_many(self.agent, [("guest-file-open", {"path": f"{self.prefix}.o.0", "mode": "r"}),
                                               ("guest-file-open", {"path": f"{self.prefix}.e.0", "mode": "r"}),
                                               ("guest-file-open", {"path": f"{self.prefix}.k", "mode": "r+"})])
        except AgentError:
            return False
        handles = [ctl] + [h for h in opened if isinstance(h, int)]
        if len(handles) < 4 or handle_epoch(self.agent) != epoch:
            self._close(handles)
            return False
        self.ctl, self.handles, self.epoch = ctl, dict(zip("oek", opened)), epoch
        return True

    def usable(self):
        """Claimed, and its handles still name its files (see the class)."""
        return self.ctl is not None and handle_epoch(self.agent) == self.epoch

    def release(self):
        """The handles are an exec's now (it closes them)."""
        self.ctl, self.handles = None, {}

    def discard(self, wait=False):
        """Closes its handles, kills an unused runner's group and removes its files; with
        wait, until done (at most the agent's timeout), else not waited for. Never raises."""
        held = [self.ctl, *self.handles.values()] if self.usable() else []
        self.release()
        try:
            self._close(held)
            # its group is killed only while the agent knows it as running: after a reboot, that
            # pid may be another process of the new boot
            status = self.agent.execute("guest-exec-status", {"pid": int(self.pid)})
            kill = f"kill -KILL -{int(self.pid)} 2>/dev/null; " if not status.get("exited") else ""
        except (AgentError, TypeError):
            kill = ""
        try:
            argv = ["sh", "-c", kill + 'rm -f -- "$0".*', self.prefix]
            if wait:
                agent_run(self.agent, argv, timeout=getattr(self.agent, "timeout", None) or 30)
            else:
                self.agent.execute("guest-exec", {"path": argv[0], "arg": argv[1:]})
        except AgentError:
            pass

    def _close(self, handles):
        try:
            execute_many(self.agent, [("guest-file-close", {"handle": h}) for h in handles if h is not None])
        except AgentError:
            pass


def execute_many(agent, calls):
    """agent.execute_many(calls) (GuestAgent: one round trip), or the same one call at a time
    for an agent object without it: each result, or the AgentCommandError it answered."""
    many = getattr(agent, "execute_many", None)
    if many is not None:
        return many(calls)
    results = []
    for command, arguments in calls:
        try:
            results.append(agent.execute(command, arguments))
        except AgentCommandError as exc:
            results.append(exc)
    return results


def handle_epoch(agent):
    """GuestAgent.handle_epoch of agent (0 for an agent object that does not track it)."""
    return getattr(agent, "handle_epoch", 0)


def new_exec_base():
    """A new path for a VM's private exec directory in the guest: EXEC_TMP/pcocc-exec.<128 random bits>.

    The runner makes it (mkdir -m 700) if it is missing and refuses it if it is a link or
    belongs to another user: its name is unguessable until made, and a user of the guest
    cannot rename or replace root's directory in a sticky /tmp.
    """
    return f"{EXEC_TMP}/pcocc-exec.{secrets.token_hex(16)}"
