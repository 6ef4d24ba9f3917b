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
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        with self._lock:
            if not self._synced:
                self.connect(timeout=self.timeout)
            try:
                self._send(json.dumps(request).encode() + b"\n")
                if not reply:
                    self._synced = False
                    return None
                answer = self._recv(time.monotonic() + timeout)
            except socket.timeout:
                self._synced = False  # its reply may still come: resync before the next command
                raise AgentTimeout(f"guest agent: no reply to {command} within {timeout:g} s") from None
            except _ConnectionLost as e:
                self._drop()
                raise AgentError(f"guest agent: connection lost during {command}: {e}") from None
            except ValueError as e:
                self._synced = False
                raise AgentError(f"guest agent: bad reply to {command}: {e}") from None
            if "error" in answer:
                raise AgentCommandError(command, answer["error"])
            if "return" not in answer:
                self._synced = False
                raise AgentError(f"guest agent: unexpected reply to {command}: {answer!r:.200}")
            return answer["return"]

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
        self.spare = spare if spare is not None and spare.base == base and spare.ctl is not None else None
        self.base = base
        self.id = self.spare.id if self.spare else secrets.token_hex(8)
        self.prefix = f"{base}/{self.id}"
        self.stdin = stdin
        self.segment = int(segment)
        self.read_size = int(read_size)
        self.stdin_segment = int(stdin_segment)
        self.pid = None
        self.result = None
        self.killed = False
        self._streams = {"out": _Segments(f"{self.prefix}.o"), "err": _Segments(f"{self.prefix}.e")}
        self._in = b""  # stdin accepted, not yet in the guest
        self._in_k = 0  # next stdin segment number
        self._in_consumed = 0  # stdin segments known to be emptied by the feeder
        self._in_eof = False  # close_stdin called
        self._in_eof_sent = False
        self._in_handle = None  # the .in FIFO, opened read-write
        self._kill_handle = None  # the .k FIFO, opened read-write
        self.reset_signals = reset_signals  # start through env --default-signal (see _runner_args)

    # ---- life ---------------------------------------------------------------------------

    def start(self):
        """Starts the command in the guest; returns self.

        With a claimed SpareRunner (see SpareRunner.claim): the command goes in a line of its
        control FIFO (two agent calls; five for a command of several lines or over SPARE_LINE
        bytes, which goes through a file), and no exec() in the guest.  Else one guest-exec
        starts a new runner with the command.
        """
        words = self.argv[2:] if self.shell else self.argv
        flags = ["1" if self.stdin else "0", "1" if self.shell else "0"]
        if self.spare is not None:
            self.pid = self.spare.pid
            quoted = shlex.join(words)
            if "\n" in quoted or len(quoted) > SPARE_LINE:  # a FIFO write is atomic up to PIPE_BUF (4 KiB)
                self._write_file(f"{self.prefix}.a", f"set -- {quoted}\n".encode())
                line = f"go {' '.join(flags)} file\n\n"
            else:
                line = f"go {' '.join(flags)} -\n{quoted}\n"
            self._write_to(self.spare.ctl, line.encode())
            return self
        args = _runner_args(self.base, self.id, self.segment, wait=False, reset_signals=self.reset_signals)
        args["arg"] += flags + words
        self.pid = self.agent.execute("guest-exec", args)["pid"]
        return self

    def poll(self):
        """One round of reads: [(\"out\"|\"err\", bytes)] that came since the last round.

        When the command has ended and everything it wrote was read, sets .result
        (an ExecResult).  A round with nothing new is the caller's cue to wait a little.
        """
        chunks = []
        if not self.killed:  # once killed, only its end matters: one call a round, not three
            for name, seg in self._streams.items():
                data = self._read_stream(seg)
                if data:
                    chunks.append((name, data))
            self._send_acks()
            if self.stdin:
                self._flush_stdin()
            if self._kill_handle is None and self.spare is not None:
                self._kill_handle = self._open(f"{self.prefix}.k", "r+")  # ready for a Ctrl-C: one call less then
        if not chunks:
            status = self.agent.execute("guest-exec-status", {"pid": self.pid})
            if status.get("exited"):
                for name, seg in self._streams.items():  # every segment is final now
                    data = self._read_stream(seg, final=True)
                    if data:
                        chunks.append((name, data))
                self.result = self._result(status)
        return chunks

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
            if self._kill_handle is not None:
                self._write_to(self._kill_handle, b"kill\n")
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
        handles += [self._in_handle, self._kill_handle, self.spare.ctl if self.spare else None]
        for h in handles:
            if h is not None:
                try:
                    self.agent.execute("guest-file-close", {"handle": h})
                except AgentError:
                    pass
        for seg in self._streams.values():
            seg.handle = seg.ack_handle = None
        self._kill_handle = None
        if self.spare is not None:
            self.spare.ctl = None
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
        self._write_to(self._in_handle, data)

    def _write_to(self, handle, data):
        """A line to a FIFO of the runner, opened read-write (so never blocking)."""
        done = self.agent.execute("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()})
        if done.get("count") != len(data):
            raise AgentError("guest agent: the command's runner stopped reading its FIFO")
        self.agent.execute("guest-file-flush", {"handle": handle})  # qemu-ga writes through stdio

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
            # segment k+1 exists: the relay finished k, whose end we may not have read yet
            while len(last := self._read(seg.handle)) > 0:
                parts.append(last)
            self._close(seg.handle)
            seg.handle, seg.k, seg.acks = nxt, seg.k + 1, seg.acks + 1
        return b"".join(parts)

    def _read(self, handle):
        got = self.agent.execute("guest-file-read", {"handle": handle, "count": self.read_size})
        try:
            return base64.b64decode(got.get("buf-b64", ""), validate=True)
        except (TypeError, ValueError) as exc:
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
            done = self.agent.execute("guest-file-write", {"handle": seg.ack_handle, "buf-b64": base64.b64encode(b"\n" * seg.acks).decode()})
            # qemu-ga's guest-file-write is an fwrite(): the bytes stay in its stdio buffer until a flush
            self.agent.execute("guest-file-flush", {"handle": seg.ack_handle})
            seg.acks -= int(done.get("count") or 0)

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
    more under load).  start() runs one guest-exec (raises AgentError); claim() waits until
    it listens; discard() kills an unused one.  One StreamingExec takes it (spare=...).
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

    def start(self):
        self.pid = self.agent.execute("guest-exec", _runner_args(self.base, self.id, self.segment, wait=True,
                                                                 reset_signals=self.reset_signals))["pid"]
        return self

    def claim(self, timeout):
        """True once the runner waits for its command (its .c FIFO opened by the host); False
        when it ended (a guest rebooted, a qemu-ga restarted) or did not get there in timeout
        seconds (a guest without mkfifo). Never raises: a spare that fails is a cold start."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                if self.agent.execute("guest-exec-status", {"pid": self.pid}).get("exited"):
                    return False
            except AgentError:
                return False  # a pid this agent does not know: it restarted, or the guest rebooted
            try:
                self.ctl = self.agent.execute("guest-file-open", {"path": f"{self.prefix}.c", "mode": "r+"})
                return True
            except AgentCommandError:
                pass  # not made yet
            except AgentError:
                return False
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def discard(self):
        """Kills an unused runner's group and removes its files (does not wait); never raises."""
        try:
            self.agent.execute("guest-exec", {"path": "sh", "arg": ["-c", f'kill -KILL -{int(self.pid)} 2>/dev/null; rm -f -- "$0".*', self.prefix]})
        except (AgentError, TypeError):
            pass


def new_exec_base():
    """A new path for a VM's private exec directory in the guest: EXEC_TMP/pcocc-exec.<128 random bits>.

    The runner makes it (mkdir -m 700) if it is missing and refuses it if it is a link or
    belongs to another user: its name is unguessable until made, and a user of the guest
    cannot rename or replace root's directory in a sticky /tmp.
    """
    return f"{EXEC_TMP}/pcocc-exec.{secrets.token_hex(16)}"
