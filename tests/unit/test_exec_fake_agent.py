"""A fake qemu-ga (no tests here: a helper of test_exec_stream.py) that runs guest-exec as real local processes and guest-file-* on real files,
with qemu-ga's semantics (qga/commands-posix.c, qga/commands.c of qemu 7.2):

* guest-exec spawns argv[0] searched in PATH, stdin /dev/null, stdout/stderr captured when
  capture-output is true; guest-exec-status says exited only once the process was reaped
  and both captured pipes reached their end;
* guest-file-open opens with fopen()'s mode (blocking open), then sets O_NONBLOCK;
* guest-file-read is fread(count): it loops until count bytes, the end of the file or an
  error; an error (EAGAIN on a FIFO with less than count bytes waiting) fails the command and
  what was read is lost;
* guest-file-write is fwrite: the bytes stay in the stdio buffer until guest-file-flush or
  guest-file-close (a FIFO's reader sees nothing before);
* handles are numbered from a counter (1000 in a new state file, qga/main.c ga_get_fd_handle)
  that a restarted agent keeps and a rebooted guest may start again (restart()); a handle
  the agent does not hold is an error ("handle '%d' has not been found").

So a StreamingExec runs its real runner script (sh, dd, setsid...) on this host.
"""

import base64
import contextlib
import fcntl
import os
import subprocess
import threading

from pcocc.agent.qga import AgentCommandError, AgentError
from pcocc.procs import descendants

_MODES = {"r": os.O_RDONLY, "rb": os.O_RDONLY, "r+": os.O_RDWR, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
          "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}


class _Proc:
    def __init__(self, popen, capture):
        self.popen = popen
        self.out = bytearray()
        self.err = bytearray()
        self.threads = []
        if capture:
            for pipe, buf in ((popen.stdout, self.out), (popen.stderr, self.err)):
                t = threading.Thread(target=self._drain, args=(pipe, buf), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _drain(pipe, buf):
        while data := pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536):
            buf.extend(data)
        pipe.close()


class LocalAgent:
    """execute(command, arguments) as qemu-ga would answer, on this host."""

    def __init__(self):
        self.procs = {}
        self.files = {}
        self.buffers = {}  # handle -> bytes written and not yet flushed
        self.next_handle = 1000
        self.log = []  # (command, arguments) of every call
        self.closed = False
        self.lock = threading.Lock()
        self.handle_epoch = 0  # as GuestAgent.handle_epoch: changes when handle numbers go back
        self._handle_high = 0
        self.old = []  # the processes of the agent before restart(), still running

    def execute(self, command, arguments=None, timeout=None, reply=True):
        args = arguments or {}
        with self.lock:
            if self.closed:  # as a real agent whose VM is gone (the handler's background work may still call)
                raise AgentError(f"guest agent: connection lost during {command}")
            self.log.append((command, args))
            value = getattr(self, "_" + command.replace("-", "_"))(**{k.replace("-", "_"): v for k, v in args.items()})
            if command == "guest-file-open":
                if value <= self._handle_high:
                    self.handle_epoch += 1
                self._handle_high = value
            return value

    def restart(self, counter=None):
        """A new agent process (qemu-ga restarted, or the guest rebooted): it knows none of the
        old one's children (which keep running here) or handles. counter: where handle numbers
        start again (None: where they were, as with a state file that survived)."""
        with self.lock:
            for fd in self.files.values():
                os.close(fd)
            self.files.clear()
            self.buffers.clear()
            self.old += self.procs.values()
            self.procs = {}
            if counter is not None:
                self.next_handle = counter - 1

    def _fd(self, handle):
        if handle not in self.files:
            raise AgentCommandError("guest-file", {"desc": f"handle '{handle}' has not been found"})
        return self.files[handle]

    def _guest_exec(self, path, arg=(), capture_output=False, input_data=None, env=None):
        out = subprocess.PIPE if capture_output else subprocess.DEVNULL
        try:
            p = subprocess.Popen([path, *arg], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        except OSError as e:
            raise AgentCommandError("guest-exec", {"desc": str(e)}) from None
        self.procs[p.pid] = _Proc(p, capture_output)
        return {"pid": p.pid}

    def _guest_exec_status(self, pid):
        if pid not in self.procs:  # qemu-ga's answer for a pid it did not start (or forgot, restarted)
            raise AgentCommandError("guest-exec-status", {"class": "GenericError", "desc": "Invalid parameter 'pid'"})
        proc = self.procs[pid]
        code = proc.popen.poll()
        if code is None or any(t.is_alive() for t in proc.threads):
            return {"exited": False}
        res = {"exited": True}
        if code < 0:
            res["signal"] = -code
        else:
            res["exitcode"] = code
        if proc.threads:
            res["out-data"] = base64.b64encode(bytes(proc.out)).decode()
            res["err-data"] = base64.b64encode(bytes(proc.err)).decode()
        return res

    def _guest_file_open(self, path, mode="r"):
        try:
            fd = os.open(path, _MODES[mode], 0o600)
        except OSError as e:
            raise AgentCommandError("guest-file-open", {"desc": f"failed to open file '{path}' (mode: '{mode}'): {e.strerror}"}) from None
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.next_handle += 1
        self.files[self.next_handle] = fd
        return self.next_handle

    def _guest_file_read(self, handle, count=4096):
        fd = self._fd(handle)
        buf = b""
        eof = False
        while len(buf) < count:
            try:
                got = os.read(fd, count - len(buf))
            except BlockingIOError:
                raise AgentCommandError("guest-file-read", {"desc": "failed to read file: Resource temporarily unavailable"}) from None
            if not got:
                eof = True
                break
            buf += got
        return {"count": len(buf), "buf-b64": base64.b64encode(buf).decode(), "eof": eof}

    def _guest_file_write(self, handle, buf_b64, count=None):
        # fwrite: into the stdio buffer, which reaches the file at a flush or a close
        self._fd(handle)
        data = base64.b64decode(buf_b64)
        self.buffers[handle] = self.buffers.get(handle, b"") + data
        return {"count": len(data), "eof": False}

    def _guest_file_flush(self, handle):
        fd = self._fd(handle)
        data = self.buffers.pop(handle, b"")
        while data:
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                raise AgentCommandError("guest-file-flush", {"desc": "failed to flush file: Resource temporarily unavailable"}) from None
            data = data[n:]
        return {}

    def _guest_file_close(self, handle):
        self._fd(handle)
        try:
            self._guest_file_flush(handle)
        except AgentCommandError:
            pass
        os.close(self.files.pop(handle))
        return {}

    def close(self):
        with self.lock:
            self.closed = True
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        for proc in [*self.procs.values(), *self.old]:
            # the whole tree, by pid: a runner leaves children that wait on FIFOs (they outlived
            # the tests); then its process group (setsid made it), also once its leader is gone:
            # the kernel gives no new process a pid still in use as a group's id
            for pid, _ in descendants(proc.popen.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
            with contextlib.suppress(OSError):
                os.killpg(proc.popen.pid, 9)
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait()


