"""What a VM's control endpoint (agent.endpoint.ControlServer) can do: the handler the
VM process (lifecycle.vmrun) serves, one op_NAME method per protocol op."""

import logging
import os
import shlex
import threading

from pcocc.agent.endpoint import decode_bytes, encode_bytes
from pcocc.errors import PcoccError

log = logging.getLogger("pcocc.run")


class ControlHandler:
    """What the control endpoint can do to this VM."""

    def __init__(self, vm, agent, rev=None, images=None, drives=()):
        self.vm = vm
        self.agent = agent
        self.rev = rev  # the image revision the VM's disk is based on
        self.images = images  # a callable giving the ImageStore
        self.drives = list(drives)  # the persistent drives [(path, cache, format)]
        self._disk_lock = threading.Lock()  # one save or checkpoint at a time
        self.checkpointed = False

    def op_ping(self):
        self.agent.ping()
        return {"pong": True}

    def op_exec(self, argv, user=None, input_b64=None, timeout=None):
        if user and user != "root":  # a name, never an option of su (checked here too: any client may call)
            from pcocc.names import check_user_name

            argv = ["su", "-s", "/bin/sh", "--", check_user_name(user), "-c", shlex.join(argv)]
        code, out, err = self.agent.exec(argv, input=decode_bytes(input_b64) if input_b64 else None, timeout=timeout or 10**9)
        return {"exit": code, "stdout_b64": encode_bytes(out), "stderr_b64": encode_bytes(err)}

    def op_writefile(self, path, data_b64, mode=None):
        self.agent.write_file(path, decode_bytes(data_b64), mode)
        return {}

    def op_readfile(self, path):
        return {"data_b64": encode_bytes(self.agent.read_file(path))}

    def op_reset(self):
        self.vm.monitor.cmd("system_reset")
        return {}

    def op_monitor_cmd(self, command):
        return {"output": self.vm.monitor.hmp(command)}

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
            return save_disk(self.vm, self.agent, self.rev, self.images(), dest=dest, full=full, safe=safe, client_present=present)

    def op_save_drive(self, index, target=None, safe=False, session=None):
        """Copy persistent drive `index` (pcocc save -i), published only while the client is still connected."""
        from pcocc.lifecycle.saving import save_drive

        present = session.present if session is not None else None
        index = int(index)
        entries = self.vm.config.settings.get("persistent-drives") or []
        with self._exclusive():
            return save_drive(self.vm, self.agent, index, entries[index] if 0 <= index < len(entries) else {},
                              target=target, safe=safe, client_present=present)

    def op_ckpt_pause(self, session=None):
        """Pause for a checkpoint; resumed by ckpt_resume, or when this client's connection
        ends before ckpt_quit (the CLI killed or its node lost)."""
        from pcocc.lifecycle import checkpoint

        with self._exclusive():
            result = checkpoint.pause(self.vm)
            if session is not None:
                self._ckpt_undo = session.on_close(self._resume_abandoned)
            return result

    def _resume_abandoned(self):
        from pcocc.lifecycle import checkpoint

        with self._disk_lock:  # waits for a save of this checkpoint still running
            if self.checkpointed:
                return
            log.warning("%s: the client of a checkpoint left before its end: resuming the VM", self.vm.config.name)
            try:
                checkpoint.resume(self.vm)
            except PcoccError as exc:
                log.error("%s: could not resume it: %s", self.vm.config.name, exc.message)

    def op_ckpt_save(self, dir, session=None):
        from pcocc.lifecycle import checkpoint

        cancelled = (lambda: not session.present()) if session is not None else None
        with self._exclusive():
            return checkpoint.save_vm(self.vm, self.rev, self.drives, dir, cancelled=cancelled)

    def op_ckpt_resume(self, session=None):
        from pcocc.lifecycle import checkpoint

        with self._exclusive():
            if session is not None and getattr(self, "_ckpt_undo", None):
                session.discard(self._ckpt_undo)
            return checkpoint.resume(self.vm)

    def op_ckpt_quit(self, session=None):
        """Stop qemu once the checkpoint is published (the CLI calls it last)."""
        from pcocc.lifecycle import checkpoint

        with self._exclusive():
            self.checkpointed = True
            if session is not None and getattr(self, "_ckpt_undo", None):
                session.discard(self._ckpt_undo)
            return checkpoint.quit_vm(self.vm, self.drives)


class _Release:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()
