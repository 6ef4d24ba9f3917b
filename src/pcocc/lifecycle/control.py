"""What a VM's control endpoint (agent.endpoint.ControlServer) can do: the handler the
VM process (lifecycle.vmrun) serves, one op_NAME method per protocol op."""

import logging
import os
import select
import shlex
import threading

from pcocc.agent.endpoint import ClientGone, decode_bytes, encode_bytes, streaming
from pcocc.errors import PcoccError, UsageError

log = logging.getLogger("pcocc.run")

# Seconds between two looks at a command's output after a silence: the wait doubles from
# EXEC_POLL_MIN after each quiet round, up to EXEC_POLL_FAST in the first second of silence
# (a command's first line comes then), EXEC_POLL_MAX until 5 s, EXEC_POLL_IDLE after: a round
# is up to three agent calls in one round trip (agent.qga.StreamingExec.poll), which the guest's
# agent answers on its one emulated CPU (traced: 1-5 ms a call on an idle host, 10-50 ms on a loaded one).
EXEC_POLL_MIN = 0.005
EXEC_POLL_FAST = 0.02
EXEC_POLL_MAX = 0.1
EXEC_POLL_IDLE = 0.3
_EXEC_BASE_LOCK = threading.Lock()
SPARE_AFTER = 1.0  # seconds a silent command runs before the next exec's runner is started
STDIN_CREDIT = 64 * 1024  # stdin bytes passed on to the guest before the client is told it may send more


class ControlHandler:
    """What the control endpoint can do to this VM."""

    def __init__(self, vm, agent, rev=None, images=None, drives=(), relay_credentials=None, on_reset=None):
        """relay_credentials(): the cluster owner's client credentials {ca, cert, key} (the
        store's ``cluster_prefix + "client"``, read as the owner: this process), for the
        relay op's TLS links to other hosts' leaders; None: this VM relays to unix links only.
        on_reset(): called after each reset (the VM process publishes the guest booting)."""
        self.vm = vm
        self._on_reset = on_reset
        self._relay_credentials = relay_credentials
        self._relay_creds = None
        self._relays = 0  # relay ops running (agent.relay): see drain_time
        self._relay_lock = threading.Lock()
        self.agent = agent
        self.rev = rev  # the image revision the VM's disk is based on
        self.images = images  # a callable giving the ImageStore
        self.drives = list(drives)  # the persistent drives [(path, cache, format)]
        self._disk_lock = threading.Lock()  # one save or checkpoint at a time
        self._spare = None  # an exec runner started ahead in the guest, claimed (agent.qga.SpareRunner)
        self._spare_mutex = threading.Lock()  # held while a spare is started and claimed
        self._spare_wanted = threading.Event()  # an exec waits for the spare being claimed
        self._spare_held = False  # no spare while the VM is paused for a checkpoint, or saved
        self._spare_again = False  # one was discarded for it: the next one is made after
        self._reset_signals = None  # runners start through env --default-signal (None: not asked yet)
        if hasattr(agent, "ready"):  # a real agent: the first spare once the guest's agent answers
            threading.Thread(target=self._first_spare, daemon=True, name=f"exec-spare-{vm.config.name}").start()

    def op_ping(self):
        self.agent.ping()
        return {"pong": True}

    @staticmethod
    def _as_user(argv, user):
        if user and user != "root":  # a name, never an option of su (checked here too: any client may call)
            from pcocc.names import check_user_name

            argv = ["su", "-s", "/bin/sh", "--", check_user_name(user), "-c", shlex.join(argv)]
        return argv

    def op_exec(self, argv, user=None, input_b64=None, timeout=None):
        """argv run to its end by guest-exec; its output whole in the answer (qemu-ga keeps 16 MiB)."""
        argv = self._as_user(argv, user)
        code, out, err = self.agent.exec(argv, input=decode_bytes(input_b64) if input_b64 else None, timeout=timeout or 10**9)
        return {"exit": code, "stdout_b64": encode_bytes(out), "stderr_b64": encode_bytes(err)}

    @streaming
    def op_exec_stream(self, stream, argv, user=None, stdin=False, input_b64=None, timeout=None):
        """argv run in the guest with its output streamed (agent.qga.StreamingExec, docs/exec.md).

        Events: {"started": true, "stdin_window": bytes} first; then {"out_b64"} and
        {"err_b64"} chunks as they come, and {"stdin_credit": bytes} as the client's stdin
        reaches the guest.  Messages: {"stdin_b64"} (at most the window not yet credited),
        {"stdin_eof": true}, {"signal": "KILL"} (kills the command's process group).
        input_b64: the whole stdin, given with the request (then stdin is closed after it).
        timeout: seconds, then killed.  Result: {"status": 0-255 (128+N: signal N),
        "killed": bool, "timed_out": bool}.  A client that leaves kills the command.
        """
        from pcocc.agent import qga

        argv = self._as_user(argv, user)
        feed = bool(stdin) or input_b64 is not None
        base = self._exec_base()
        spare = self._take_spare(base)
        ex = qga.StreamingExec(self.agent, argv, base, stdin=feed, segment=qga.EXEC_SEGMENT, stdin_segment=qga.STDIN_SEGMENT,
                               spare=spare, reset_signals=spare is None and self._signals_reset())
        failed = False
        try:
            ex.start()
            return self._stream_exec(stream, ex, input_b64, timeout)
        except qga.AgentError:
            failed = True
            self._exec_dir = None  # e.g. the directory was taken in the guest: the next exec makes another
            raise
        except ClientGone:
            log.info("%s: the client of an exec left: killing the command", self.vm.config.name)
            ex.kill()
            raise
        finally:
            try:
                if ex.result is None and not ex.killed and ex.pid is not None:
                    ex.kill()
            except PcoccError as exc:
                log.warning("%s: killing an exec's command: %s", self.vm.config.name, exc.message)
            # the answer goes to the client now: the cleanup and the next spare runner follow in
            # the background (their guest-exec calls cost 10-100 ms under emulation)
            threading.Thread(target=self._after_exec, args=(ex, not failed), daemon=True,
                             name=f"exec-cleanup-{self.vm.config.name}").start()

    def _after_exec(self, ex, spare):
        if spare:  # first: the next exec waits for it rather than start its own runner
            self._make_spare()
        try:
            ex.cleanup()
        except PcoccError as exc:
            log.warning("%s: cleaning up after an exec: %s", self.vm.config.name, exc.message)

    def _first_spare(self):
        """Starts the VM's first spare runner once its agent answers (given up after 15 min:
        an image without agent); so that even the first exec after a start finds one."""
        import time

        end = time.monotonic() + 900
        while not self.agent.ready and time.monotonic() < end:
            time.sleep(0.5)
        if self.agent.ready:
            self._make_spare()

    def _signals_reset(self):
        """Whether runners start through env --default-signal (asked once per VM process:
        agent.qga.signals_to_reset; one exec more per runner, only where qemu-ga ignores them)."""
        from pcocc.agent.qga import AgentError, signals_to_reset

        if self._reset_signals is None:
            try:
                self._reset_signals = signals_to_reset(self.agent)
            except AgentError as exc:
                log.info("%s: the signals of the guest agent's children: %s", self.vm.config.name, exc.message)
                return False
        return self._reset_signals

    def _take_spare(self, base):
        """The spare runner of this VM, claimed (see agent.qga.SpareRunner), or None (then the
        exec starts its own runner, and the next spare is made after it)."""
        self._spare_wanted.set()  # a spare still being claimed is looked at more often
        with self._spare_mutex:  # held while a spare is being started: the exec waits for it
            spare, self._spare = self._spare, None
            self._spare_wanted.clear()
        if spare is None:
            return None
        if spare.base == base and spare.usable():
            return spare
        spare.discard()
        return None

    def _make_spare(self):
        """Starts a runner ahead for the next exec and claims it (its FIFO and first segments
        opened: the exec only writes its command and reads), unless one waits already or
        the VM is being checkpointed or saved; never raises."""
        from pcocc.agent.qga import AgentError, SpareRunner

        with self._spare_mutex:
            if self._spare is not None or self._spare_held:
                return
            try:
                spare = SpareRunner(self.agent, self._exec_base(), reset_signals=self._signals_reset()).start()
            except AgentError as exc:
                log.info("%s: no spare exec runner: %s", self.vm.config.name, exc.message)
                return
            if spare.claim(getattr(self.agent, "timeout", None) or 30.0, hurry=self._spare_wanted):
                self._spare = spare
            else:
                log.info("%s: the spare exec runner did not get ready: the next exec starts its own", self.vm.config.name)
                spare.discard()

    def _hold_spares(self):
        """No runner waits in the guest from now on (until _release_spares): a checkpoint or a
        template snapshot would keep it in the guest's memory, asleep for ever after a restore
        (the restored VM's process knows nothing of it), and a save would keep its files if
        the guest's /tmp is on its disk. The spare is discarded before this returns: its group
        sent SIGKILL unless the agent saw it end already, and its files removed (a snapshot
        may still hold it dying; it ends as soon as the VM runs)."""
        self._spare_wanted.set()
        with self._spare_mutex:  # waits for a spare being claimed
            self._spare_held = True
            spare, self._spare = self._spare, None
            self._spare_wanted.clear()
        self._spare_again = spare is not None
        if spare is not None:
            spare.discard(wait=True)

    def _release_spares(self):
        """Spares again, and the next one started now if one was discarded."""
        if self._spare_held:
            self._spare_held = False
            if self._spare_again:
                threading.Thread(target=self._make_spare, daemon=True, name=f"exec-spare-{self.vm.config.name}").start()

    def _stream_exec(self, stream, ex, input_b64, timeout):
        import time

        if input_b64 is not None:
            ex.write_stdin(decode_bytes(input_b64))
            ex.close_stdin()
        window = ex.stdin_room() if ex.stdin and input_b64 is None else 0
        stream.send({"started": True, "stdin_window": window})
        deadline = time.monotonic() + float(timeout) if timeout else None
        received = credited = 0  # stdin bytes from the client, and given back as credit
        timed_out = False
        wait = 0.0
        quiet_since = started = time.monotonic()
        spare_asked = False
        while ex.result is None:
            chunks = ex.poll()
            if not spare_asked and (chunks or time.monotonic() - started > SPARE_AFTER):
                # the next exec's runner starts once this command is under way: its first output,
                # or SPARE_AFTER; sooner, it would compete with the command's start for the guest's
                # CPU. Started at this exec's end instead, it was not ready for an exec that came
                # soon after (bench/exec.py, one VM: first line 0.78 s with runs 1 s apart and
                # 2.55 s back to back, against 0.40 s and 0.69 s)
                spare_asked = True
                threading.Thread(target=self._make_spare, daemon=True, name=f"exec-spare-{self.vm.config.name}").start()
            for name, data in chunks:
                stream.send({f"{name}_b64": encode_bytes(data)})
            passed = received - ex.stdin_queued - credited if window else 0
            if passed >= STDIN_CREDIT or (passed > 0 and not ex.stdin_queued):
                stream.send({"stdin_credit": passed})
                credited += passed
            if deadline is not None and not ex.killed and time.monotonic() >= deadline:
                timed_out = True
                ex.kill()
                wait, quiet_since = 0.0, time.monotonic()  # its end comes soon: look often
            if chunks:
                wait, quiet_since = 0.0, time.monotonic()
            else:  # a long silence is polled less often: each look costs the guest some CPU
                quiet = time.monotonic() - quiet_since
                limit = EXEC_POLL_FAST if quiet < 1 else EXEC_POLL_MAX if quiet < 5 else EXEC_POLL_IDLE
                wait = min(max(wait * 2, EXEC_POLL_MIN), limit)
            msg = stream.receive(wait)
            while msg is not None:
                if "stdin_b64" in msg and window and not ex.stdin_closed:
                    data = decode_bytes(msg["stdin_b64"])
                    received += len(data)
                    ex.write_stdin(data)
                elif msg.get("stdin_eof") and window:
                    ex.close_stdin()
                elif msg.get("signal") and not ex.killed:
                    ex.kill()
                    wait, quiet_since = 0.0, time.monotonic()
                msg = stream.receive(0)
        res = ex.result
        return {"status": res.status, "killed": res.killed and not timed_out, "timed_out": timed_out}

    def _exec_base(self):
        """This VM's private exec directory in the guest (one random name per VM process)."""
        from pcocc.agent.qga import new_exec_base

        with _EXEC_BASE_LOCK:
            if getattr(self, "_exec_dir", None) is None:
                self._exec_dir = new_exec_base()
            return self._exec_dir

    def op_writefile(self, path, data_b64, mode=None):
        self.agent.write_file(path, decode_bytes(data_b64), mode)
        return {}

    def op_readfile(self, path):
        return {"data_b64": encode_bytes(self.agent.read_file(path))}

    CONSOLE_LOG_MAX = 16 << 20  # bytes of the console log sent back: its end, a guest may print for ever

    def op_console_log(self):
        """The VM's console log (its last CONSOLE_LOG_MAX bytes): pcocc console -l from another
        host than the VM's. {"data_b64", "cut": bytes left out at its start}."""
        path = self.vm.config.path("console.log")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - self.CONSOLE_LOG_MAX))
                data = f.read(self.CONSOLE_LOG_MAX)
        except OSError as exc:
            raise PcoccError(f"{self.vm.config.name}: no console log: {exc.strerror}") from None
        return {"data_b64": encode_bytes(data), "cut": max(0, size - self.CONSOLE_LOG_MAX)}

    @streaming
    def op_console(self, stream):
        """The VM's serial console, both ways: pcocc console from another host than the VM's.

        Events: {"attached": true} first, then {"out_b64"} as the guest writes. Messages:
        {"in_b64"} (keystrokes). It ends when the client leaves (Ctrl-] on its side) or the
        console closes (qemu ended): result {"closed": true}. qemu serves one console client
        at a time, as on the VM's host."""
        import select
        import socket

        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(self.vm.config.path("console.sock"))
        except OSError as exc:
            sock.close()
            raise PcoccError(f"{self.vm.config.name}: cannot attach to its console: {exc.strerror}") from None
        try:
            stream.send({"attached": True})
            while True:
                ready = [stream] if stream.ready() else select.select([sock, stream], [], [], 5.0)[0]
                if sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return {"closed": True}
                    stream.send({"out_b64": encode_bytes(data)})
                if stream in ready:
                    msg = stream.receive(0)  # ClientGone when the client left: the console is free again
                    while msg is not None:
                        if "in_b64" in msg:
                            sock.sendall(decode_bytes(msg["in_b64"]))
                        msg = stream.receive(0)
        finally:
            sock.close()

    @streaming
    def op_relay(self, stream, op, args, plan, timeout=None):
        """This VM as its host's relay: op(**args) on every VM of plan, their events and answers
        tagged by VM name (agent.relay, which documents the protocol and whose credentials
        are used: the owner's, of this cluster, as the CLI uses them)."""
        from pcocc.agent import relay

        with self._relay_lock:
            self._relays += 1
        try:
            return relay.serve(stream, op, args, plan, self._relay_connect, timeout)
        finally:
            with self._relay_lock:
                self._relays -= 1

    def drain_time(self):
        """Seconds the endpoint's stop should let its requests answer (ControlServer.stop's
        drain): a relay op running (this VM is its host's leader) passes on the answers of the
        other VMs after its own qemu is gone (a checkpoint's quit), for up to a relay's
        open timeout; else 3 s (a checkpoint's own answer)."""
        from pcocc.agent import relay

        return relay.OPEN_TIMEOUT if self._relays else 3.0

    def _relay_connect(self, link, timeout):
        from pcocc.agent.endpoint import AgentError, ControlClient

        if self._relay_creds is None:
            creds = self._relay_credentials() if self._relay_credentials else None
            if not creds:
                raise AgentError(f"{self.vm.config.name} cannot relay to other hosts: no client credentials of its cluster")
            self._relay_creds = creds
        c = self._relay_creds
        return ControlClient(tuple(link["address"]), ca_pem=c["ca"], cert_pem=c["cert"], key_pem=c["key"], timeout=timeout)

    def op_reset(self):
        """Hard reset (QMP system_reset): the guest boots again, and on_reset() is told."""
        self.vm.monitor.cmd("system_reset")
        if self._on_reset is not None:
            self._on_reset()
        return {}

    def op_monitor_cmd(self, command):
        output = self.vm.monitor.hmp(command)
        if command.split()[:1] == ["system_reset"] and self._on_reset is not None:
            self._on_reset()  # as pcocc reset: the record says booting
        return {"output": output}

    def op_dump(self, path):
        path = os.path.abspath(path)
        self.vm.monitor.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}")
        return {"path": path}

    def _exclusive(self):
        if not self._disk_lock.acquire(blocking=False):
            raise PcoccError(f"{self.vm.config.name}: a save or checkpoint of this VM is already in progress")
        return _Release(self._disk_lock)

    def op_save(self, dest=None, full=False, safe=False, session=None):
        """The disk as a new image revision, published only while the client is still connected."""
        from pcocc.lifecycle.saving import save_disk

        present = session.present if session is not None else None
        with self._exclusive():
            self._hold_spares()
            try:
                return save_disk(self.vm, self.agent, self.rev, self.images(), dest=dest, full=full, safe=safe, client_present=present)
            finally:
                self._release_spares()

    def op_save_drive(self, index, target=None, safe=False, session=None):
        """Copy persistent drive `index` (pcocc save -i), published only while the client is still connected."""
        from pcocc.lifecycle.saving import save_drive

        present = session.present if session is not None else None
        index = int(index)
        entries = self.vm.config.settings.get("persistent-drives") or []
        with self._exclusive():
            return save_drive(self.vm, self.agent, index, entries[index] if 0 <= index < len(entries) else {},
                              target=target, safe=safe, client_present=present)

    @streaming
    def op_ckpt(self, stream):
        """This VM's part of a checkpoint (pcocc ckpt), on one stream, so that the CLI reaches
        every VM through the host relays (agent.relay) and holds no connection per VM.

        The order is pcocc.lifecycle.checkpoint's: the VM pauses, and the event {"paused": true}
        says so.  Messages, then: {"save": DIR} writes the VM's files into DIR
        (checkpoint.save_vm; the event {"saved": ENTRY} gives its manifest entry once every
        file is fsynced); {"quit": true} stops qemu (result: quit_vm's drive stamps); or
        {"resume": true} at any time before the quit, a save then given up (result:
        {"resumed": true}).  Until the quit, a client that leaves (Ctrl-C, SIGKILL, a relay or
        node lost; a save polls for it and gives up) or a failure here resumes the VM: it
        never stays paused for ever.
        """
        from pcocc.lifecycle import checkpoint

        name = self.vm.config.name
        settled = False  # quit, or resumed at the client's request: nothing to undo
        with self._exclusive():
            self._hold_spares()
            try:
                checkpoint.pause(self.vm)
                stream.send({"paused": True})
                while True:
                    msg = stream.receive(None)
                    if isinstance(msg.get("save"), str):
                        try:  # given up when the client leaves, or sends something (a resume: another VM failed)
                            entry = checkpoint.save_vm(self.vm, self.rev, self.drives, msg["save"], cancelled=lambda: _heard(stream))
                        except PcoccError:
                            if not _heard(stream):
                                raise
                            continue  # the next message (or the client's end) says what comes next
                        stream.send({"saved": entry})
                    elif msg.get("quit") is True:
                        settled = True
                        return checkpoint.quit_vm(self.vm, self.drives)
                    elif msg.get("resume") is True:
                        settled = True
                        checkpoint.resume(self.vm)
                        self._release_spares()
                        return {"resumed": True}
                    else:
                        raise UsageError(f"bad checkpoint message: {sorted(msg)} (save, quit or resume expected)")
            except ClientGone:
                log.warning("%s: the client of a checkpoint left before its end: resuming the VM", name)
                raise
            finally:
                if not settled:
                    try:
                        checkpoint.resume(self.vm)
                    except PcoccError as exc:
                        log.error("%s: could not resume it after the checkpoint's failure: %s", name, exc.message)
                        raise PcoccError(f"{name}: could not resume it after the checkpoint's failure: {exc.message}") from None
                    self._release_spares()


def _heard(stream):
    """Whether the client sent something, or closed its side, since the last receive (a poll
    of the connection, nothing read: the message stays for the next receive)."""
    if stream.ready():
        return True
    poller = select.poll()
    poller.register(stream.fileno(), select.POLLIN | select.POLLRDHUP)
    try:
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _Release:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()
