"""The phases of a starting VM, a one-line summary of a cluster's start, and that line shown
as the start goes (start_line: live on a terminal, log lines elsewhere; the CLI's and the
SLURM launcher's).

A VM process (lifecycle.vmrun) publishes one store update per phase, with the
wall-clock time it entered it (`since`, seconds since the epoch):

    pending     no record yet (its task or process has not started)
    starting    its overlay and cloud-init seed are made
    restoring   qemu loads a checkpoint or snapshot (instead of booting)
    qemu-start  qemu runs, the guest has printed nothing yet
    booting     the guest writes to its console (the kernel boots)
    running     its guest agent answered
    stopped, failed  the end (failed with its reason)

The scale work counts these updates: a handful per VM, never one per poll.
"""

import contextlib
import os
import threading
import time

STARTING_PHASES = ("pending", "starting", "restoring", "qemu-start", "booting")
ENDED = ("stopped", "failed")
# qemu runs: what the original pcocc waited for before it gave the user the alloc shell or ran
# -E (its VMs needed no agent for that); the guest agent's answer ("running") comes after
QEMU_RUNS = ("restoring", "qemu-start", "booting", "running")


def started(vm, until="running"):
    """Whether a VM record has reached `until`: "running" (its guest agent answered, or none
    did within the bound: agent "none") or "qemu" (qemu runs: QEMU_RUNS)."""
    return vm.get("state") == "running" if until == "running" else vm.get("state") in QEMU_RUNS


def summary(vms, now=None, until="running", timed=True):
    """One line on how far a starting cluster is, e.g.
    '2/4 VMs running; booting 1, qemu-start 1; slowest: vm3 qemu-start for 12 s'.

    vms: the VM records ([{name, state, since?}], as Backend.job gives them); now: the
    wall-clock time (default: time.time()); until: what counts as started (started()):
    "running", or "qemu" ('2/4 VMs with qemu running; ...'); timed: with the time the
    slowest VM has been in its phase (without: a line that changes only with the phases,
    for a log line per change). The slowest VM is the one in the earliest phase, and in it
    the longest (its `since`); none is named once all have started.
    """
    now = time.time() if now is None else now
    done = sum(started(v, until) for v in vms)
    counts = {}
    for v in vms:
        if v.get("state") != "running":
            counts[v.get("state", "pending")] = counts.get(v.get("state", "pending"), 0) + 1
    order = {p: i for i, p in enumerate(STARTING_PHASES + ENDED)}
    text = f"{done}/{len(vms)} VMs {'running' if until == 'running' else 'with qemu running'}"
    if counts:
        text += "; " + ", ".join(f"{p} {n}" for p, n in sorted(counts.items(), key=lambda pn: order.get(pn[0], -1)))
    waiting = [v for v in vms if v.get("state", "pending") in STARTING_PHASES and not started(v, until)]
    if waiting and len(vms) > 1:
        slow = min(waiting, key=lambda v: (order[v.get("state", "pending")], v.get("since") or now))
        took = f" for {max(0.0, now - slow['since']):.0f} s" if timed and slow.get("since") else ""
        text += f"; slowest: {slow['name']} {slow.get('state', 'pending')}{took}"
    return text


class StartProgress:
    """How far a starting cluster is (summary), shown as it changes.

    On a terminal (tty): one live line, redrawn in place by update() and tick() when its
    text changed (a carriage return, the text cut to the terminal's width but for its
    elapsed time, erase to the end of the line), ended with a newline by finish(). Elsewhere: a line through log() each time the
    summary changes (its phases, not its times). Thread-safe: a ticker thread and the
    waiting thread may both update it.
    """

    def __init__(self, stream, prefix, tty, log=None, until="running", clock=time.monotonic, wallclock=time.time, columns=None):
        self.stream, self.prefix, self.tty, self.log, self.until = stream, prefix, tty, log, until
        self.columns = columns or (lambda: _columns(stream))  # the terminal's width, asked at each redraw (it may change)
        self.clock, self.wallclock = clock, wallclock
        self.start = clock()
        self.vms = None
        self.logged = None  # the last summary logged (untimed)
        self.drawn = False  # a live line is on the terminal, not yet ended
        self.drawn_line = None  # its text (not drawn again when unchanged)
        self.done = False
        self.lock = threading.Lock()

    def text(self):
        return "".join(self._parts())

    def _parts(self):
        """(the summary, its elapsed time), printable only."""
        def printable(text):
            return "".join(c if c.isprintable() else " " for c in text)

        return (printable(f"{self.prefix}: {summary(self.vms, self.wallclock(), self.until)}"),
                f" ({self.clock() - self.start:.0f} s)")

    def update(self, vms):
        """Show the VM records vms ([{name, state, since?}], as Backend.job gives them)."""
        with self.lock:
            if self.done:
                return
            self.vms = list(vms)
            if self.tty:
                self._draw()
                return
            now = summary(self.vms, self.wallclock(), self.until, timed=False)
            if now != self.logged:
                self.logged = now
                if self.log:
                    self.log(self.text())

    def tick(self):
        """Redraw the live line for its elapsed time (nothing elsewhere)."""
        with self.lock:
            if self.tty and not self.done and self.vms is not None:
                self._draw()

    def finish(self):
        """End the live line (a newline): later output goes below it. Idempotent."""
        with self.lock:
            if self.drawn:
                self.stream.write("\n")
                self.stream.flush()
            self.drawn, self.done = False, True

    def _draw(self):
        # one column short: a line that fills the last column makes some terminals wrap
        width = max(self.columns() - 1, 1)
        head, elapsed = self._parts()
        line = head + elapsed
        if len(line) > width:  # the summary's end is cut, at a word, not the elapsed time
            room = width - len(elapsed) - len("...")
            if room > 0:
                kept = head[:room + 1]  # one more: a word that ends just there stays whole
                kept = kept[:kept.rfind(" ")] if " " in kept else kept[:room]
                line = kept.rstrip(" ;,") + "..." + elapsed
            else:
                line = line[:width]
        if line == self.drawn_line:
            return
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self.drawn, self.drawn_line = True, line


def _columns(stream, default=80):
    try:
        return os.get_terminal_size(stream.fileno()).columns or default
    except (AttributeError, OSError, ValueError):
        return default


@contextlib.contextmanager
def start_line(stream, prefix, log, tty=None, fetch=None, until="running", interval=0.5):
    """Show a cluster's start as StartProgress does, on stream: a live line when it is a
    terminal (tty: default stream.isatty()), else log lines through log(text).

    Yields show(running=None, total=None, vms=None), a progress callback for
    Backend.wait_ready (show(running, total)) or for the SLURM launcher's wait
    (show(vms=vms): running and total are then counted in vms, started()).
    fetch(): the cluster's VM records now (e.g. backend.job(jobid)[1]); a call without
    vms fetches them, and a ticker thread fetches them every `interval` s (the phases
    change between two calls that tell only how many VMs started) and redraws the line,
    so that its elapsed time (whole seconds) moves at least once a second. The line is
    ended (a newline) once every VM started, or when the block ends, before any error is
    shown. The VM records come from their owners' store records: names and states are
    drawn without control characters.
    """
    from pcocc.errors import PcoccError

    if tty is None:
        tty = hasattr(stream, "isatty") and stream.isatty()
    progress = StartProgress(stream, prefix, tty, log=log, until=until)
    stop = threading.Event()

    def current():
        try:
            return fetch() if fetch else None
        except PcoccError:  # gone or unreachable for now: the waiting thread says why, if it matters
            return None

    def ticker():
        while not stop.wait(interval):
            vms = current()
            if vms is not None:
                progress.update(vms)  # redraws the line too
            else:
                progress.tick()

    def show(running=None, total=None, vms=None):
        vms = current() if vms is None else vms
        if vms is not None:
            progress.update(vms)
            if running is None:
                running, total = sum(started(v, until) for v in vms), len(vms)
        if running is not None and total and running >= total:
            stop.set()
            progress.finish()

    thread = threading.Thread(target=ticker, name="pcocc-start-progress", daemon=True) if fetch or tty else None
    if thread:
        thread.start()
    try:
        yield show
    finally:
        stop.set()
        if thread:
            thread.join()
        progress.finish()
