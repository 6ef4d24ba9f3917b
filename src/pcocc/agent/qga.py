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
"""

import base64
import json
import random
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
