"""QMP, through qemu.qmp's synchronous client, shared safely between threads."""

import asyncio
import os
import threading
import time

from pcocc.errors import PcoccError, TimeoutExpired


class MonitorError(PcoccError):
    pass


class Monitor:
    def __init__(self, path):
        self.path = path
        self._qmp = None
        self._lock = threading.Lock()

    def connect(self, deadline, alive=lambda: True):
        """Connect once qemu has created its socket (polled, no fixed sleep)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        while True:
            if os.path.exists(self.path):
                qmp = QEMUMonitorProtocol(self.path)
                try:
                    qmp.connect()
                    self._qmp = qmp
                    return
                except (OSError, Exception):  # qemu.qmp raises its own ConnectError
                    qmp.close()
            if not alive():
                raise MonitorError("qemu exited before its monitor answered")
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"qemu monitor {self.path} did not answer")
            time.sleep(0.01)

    def cmd(self, name, **args):
        from qemu.qmp import QMPError

        with self._lock:
            if self._qmp is None:
                raise MonitorError("not connected to the qemu monitor")
            try:
                return self._qmp.cmd(name, **args)
            except QMPError as exc:
                raise MonitorError(f"qemu: {name}: {exc}") from None
            except (OSError, EOFError) as exc:
                raise MonitorError(f"qemu monitor lost: {exc}") from None

    def wait_event(self, name, match, deadline):
        """Wait for event `name` whose data satisfies match(data); False at the deadline."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._lock:
                try:
                    event = self._qmp.pull_event(wait=min(remaining, 0.5))
                except asyncio.TimeoutError:  # nothing yet: look again (the lock is let go meanwhile)
                    continue
                except Exception:  # noqa: BLE001 - qemu gone: the caller sees it
                    return False
            if event and event.get("event") == name and match(event.get("data", {})):
                return True

    def hmp(self, command):
        return self.cmd("human-monitor-command", **{"command-line": command})

    def vcpu_threads(self):
        """{vCPU index: host thread id}"""
        return {c["cpu-index"]: c["thread-id"] for c in self.cmd("query-cpus-fast")}

    def close(self):
        with self._lock:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
