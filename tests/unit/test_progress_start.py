"""A cluster's start shown as it goes (issue 14): a live line on a terminal (redrawn in place,
cut to the terminal's width, ended with a newline), log lines elsewhere; fake terminal streams,
fake clocks, no timing."""

import fcntl
import io
import os
import struct
import termios
import threading

import pytest

from pcocc.phases import StartProgress, _columns, start_line, summary


class Terminal(io.StringIO):
    def isatty(self):
        return True


def vm(name, state, since=None):
    return {"name": name, "state": state, **({"since": since} if since is not None else {})}


def redraws(text):
    """The successive states of the live line: what each carriage return starts."""
    assert text.count("\n") <= 1 and (not text or text.startswith("\r"))
    out = []
    for part in text.rstrip("\n").split("\r")[1:]:
        assert part.endswith("\x1b[K")  # erase to the end of the line: a shorter line leaves nothing behind
        out.append(part[:-len("\x1b[K")])
    return out


def progress(stream, tty=True, columns=100, log=None, until="running"):
    ticks = iter(range(0, 1000))
    return StartProgress(stream, "cluster 7", tty, log=log, until=until, clock=lambda: next(ticks), wallclock=lambda: 100.0,
                         columns=lambda: columns)


def test_the_live_line_is_redrawn_in_place_and_ended_with_a_newline():
    term = Terminal()
    p = progress(term)
    p.update([vm("vm0", "starting", 99.0), vm("vm1", "pending")])
    p.update([vm("vm0", "qemu-start", 95.0), vm("vm1", "starting", 99.0)])
    p.update([vm("vm0", "booting", 97.0), vm("vm1", "qemu-start", 98.0)])
    p.update([vm("vm0", "running"), vm("vm1", "running")])
    p.finish()
    text = term.getvalue()
    assert text.endswith("\x1b[K\n") and text.count("\n") == 1
    lines = redraws(text)
    assert lines == ["cluster 7: 0/2 VMs running; pending 1, starting 1; slowest: vm1 pending (1 s)",
                     "cluster 7: 0/2 VMs running; starting 1, qemu-start 1; slowest: vm1 starting for 1 s (2 s)",
                     "cluster 7: 0/2 VMs running; qemu-start 1, booting 1; slowest: vm1 qemu-start for 2 s (3 s)",
                     "cluster 7: 2/2 VMs running (4 s)"]


def test_a_tick_redraws_the_elapsed_time_and_nothing_is_drawn_before_the_first_records():
    term = Terminal()
    p = progress(term)
    p.tick()
    assert term.getvalue() == ""
    p.update([vm("vm0", "booting", 99.0)])
    p.tick()
    p.tick()
    assert redraws(term.getvalue()) == [f"cluster 7: 0/1 VMs running; booting 1 ({s} s)" for s in (1, 2, 3)]


def test_an_unchanged_line_is_not_drawn_again():
    term = Terminal()
    p = StartProgress(term, "cluster 7", True, clock=lambda: 5.0, wallclock=lambda: 100.0, columns=lambda: 100)
    for _ in range(3):
        p.update([vm("vm0", "booting", 99.0)])
        p.tick()
    assert redraws(term.getvalue()) == ["cluster 7: 0/1 VMs running; booting 1 (0 s)"]


def test_the_line_is_cut_to_the_terminal_s_width():
    term = Terminal()
    p = progress(term, columns=30)
    p.update([vm(f"vm{i}", "qemu-start", 90.0 + i) for i in range(8)])
    p.finish()
    (line,) = redraws(term.getvalue())
    # at most 29 columns (the last one left free: no wrap), cut at a word, the time kept
    assert line == "cluster 7: 0/8 VMs... (1 s)"
    p = progress(term := Terminal(), columns=60)
    p.update([vm(f"vm{i}", "qemu-start", 90.0 + i) for i in range(8)])
    p.finish()
    (line,) = redraws(term.getvalue())
    assert len(line) <= 59 and line.endswith("... (1 s)") and not line[:-len("... (1 s)")].endswith(("qemu-s", " for 9"))


def test_finish_ends_the_line_once_and_later_updates_draw_nothing():
    term = Terminal()
    p = progress(term)
    p.finish()
    assert term.getvalue() == ""  # nothing drawn: no empty line either
    p = progress(term)
    p.update([vm("vm0", "running")])
    p.finish()
    p.finish()
    p.update([vm("vm0", "stopped")])
    p.tick()
    assert term.getvalue().count("\n") == 1 and "stopped" not in term.getvalue()


def test_elsewhere_one_log_line_per_change_of_the_summary_never_for_time_alone():
    stream, logged = io.StringIO(), []
    p = progress(stream, tty=False, log=logged.append)
    p.update([vm("vm0", "pending"), vm("vm1", "pending")])
    p.update([vm("vm0", "pending"), vm("vm1", "pending")])
    p.tick()
    p.update([vm("vm0", "qemu-start", 95.0), vm("vm1", "pending")])
    p.update([vm("vm0", "qemu-start", 95.0), vm("vm1", "pending")])
    p.update([vm("vm0", "running"), vm("vm1", "booting", 99.0)])
    p.update([vm("vm0", "running"), vm("vm1", "running")])
    p.finish()
    assert stream.getvalue() == ""  # no carriage return, no escape: plain lines, through log
    assert logged == ["cluster 7: 0/2 VMs running; pending 2; slowest: vm0 pending (1 s)",
                      "cluster 7: 0/2 VMs running; pending 1, qemu-start 1; slowest: vm1 pending (2 s)",
                      "cluster 7: 1/2 VMs running; booting 1; slowest: vm1 booting for 1 s (3 s)",
                      "cluster 7: 2/2 VMs running (4 s)"]


def test_until_qemu_counts_the_vms_whose_qemu_runs():
    vms = [vm("vm0", "booting", 99.0), vm("vm1", "qemu-start", 90.0), vm("vm2", "starting", 98.0)]
    assert summary(vms, now=100.0, until="qemu") == "2/3 VMs with qemu running; starting 1, qemu-start 1, booting 1; slowest: vm2 starting for 2 s"
    # every qemu runs: no VM is the slowest any more, though the guests still boot
    assert summary(vms[:2], now=100.0, until="qemu") == "2/2 VMs with qemu running; qemu-start 1, booting 1"
    assert summary(vms, now=100.0, timed=False) == "0/3 VMs running; starting 1, qemu-start 1, booting 1; slowest: vm2 starting"


# ---- start_line: the callback of Backend.wait_ready and of the SLURM launcher


def test_wait_ready_s_callback_fetches_the_records_and_ends_the_line_when_all_run():
    term = Terminal()
    records = [[vm("vm0", "pending")], [vm("vm0", "booting", 1.0)], [vm("vm0", "running")]]
    fetched = []

    def fetch():
        fetched.append(1)
        return records[min(len(fetched), len(records)) - 1]

    with start_line(term, "cluster 3", None, tty=True, fetch=fetch, interval=3600) as show:
        show(0, 1)
        show(0, 1)
        show(1, 1)
        done = term.getvalue()
        assert done.endswith("\n")  # at once: a warning wait_ready prints next goes below the line
        show(1, 1)
    assert term.getvalue() == done
    lines = redraws(done)
    assert [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in lines] == \
        ["0/1 VMs running; pending 1", "0/1 VMs running; booting 1", "1/1 VMs running"]


def test_the_launcher_s_callback_counts_the_started_vms_itself():
    logged = []
    with start_line(io.StringIO(), "cluster 3", logged.append, tty=False, until="qemu") as show:
        show(vms=[vm("vm0", "starting"), vm("vm1", "pending")])
        show(vms=[vm("vm0", "booting", 5.0), vm("vm1", "qemu-start", 6.0)])
        show(vms=[vm("vm0", "running"), vm("vm1", "running")])  # ended at once: nothing after
    assert [line.split(": ", 1)[1].split(";")[0] for line in logged] == \
        ["0/2 VMs with qemu running", "2/2 VMs with qemu running"]


def test_an_error_while_waiting_ends_the_line_before_it_is_shown():
    term = Terminal()
    with pytest.raises(RuntimeError), start_line(term, "cluster 3", None, tty=True, interval=3600) as show:
        show(0, 2, [vm("vm0", "pending"), vm("vm1", "qemu-start", 1.0)])
        raise RuntimeError("vm1 failed")
    assert term.getvalue().endswith("\x1b[K\n") and term.getvalue().count("\n") == 1


def test_the_ticker_fetches_the_phases_between_two_calls():
    """wait_ready calls back only when the number of started VMs changes: the ticker thread sees
    the phases in between (and redraws the elapsed time)."""
    term = Terminal()
    states = iter(["pending", "qemu-start", "booting"])
    seen_booting = threading.Event()

    def fetch():
        state = next(states, "booting")
        if state == "booting":
            seen_booting.set()
        return [vm("vm0", state, 1.0)]

    with start_line(term, "cluster 3", None, tty=True, fetch=fetch, interval=0.01) as show:
        show(0, 1)
        assert seen_booting.wait(60)
    phases_shown = [line.split("; ")[1].split(" (")[0] for line in redraws(term.getvalue())]
    assert phases_shown[:3] == ["pending 1", "qemu-start 1", "booting 1"]


def test_a_fetch_that_fails_is_skipped():
    from pcocc.errors import NotFoundError

    def fetch():
        raise NotFoundError("no virtual cluster with job id 3")

    logged = []
    with start_line(io.StringIO(), "cluster 3", logged.append, tty=False, fetch=fetch, interval=3600) as show:
        show(0, 1)
    assert logged == []


def test_the_width_is_the_terminal_s():
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 37, 0, 0))
        with os.fdopen(os.dup(slave), "w") as stream:
            assert _columns(stream) == 37
        assert _columns(io.StringIO()) == 80  # not a terminal: a default
    finally:
        os.close(master)
        os.close(slave)


# ---- through the CLI (local backend, in-process)


@pytest.fixture
def site(cli, tmp_path):
    from fake_backend import FakeBackend, install, local_site

    local_site(cli, tmp_path)

    class Starting(FakeBackend):
        """Its VM goes through its phases while wait_ready waits."""

        state = "pending"

        def job(self, jobid):
            info, vms = super().job(jobid)
            return info, [{**v, "state": self.state, "since": 1.0} for v in vms]

        def wait_ready(self, jobid, progress=None, timeout=3600, alive=None, warn=None, until="running"):
            for self.state in ("pending", "starting", "qemu-start", "booting", "running"):
                # as Backend.wait_ready, which hands over the records it follows: nothing else reads them
                progress(int(self.state == "running"), 1, self.job(jobid)[1])

    with install() as backend:
        backend.__class__ = Starting
        yield cli


def test_batch_wait_logs_each_phase_when_stderr_is_not_a_terminal(site):
    r = site("batch", "--wait", "tiny:1")
    assert r.status == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("cluster 1: ")]
    assert [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in lines] == \
        ["0/1 VMs running; pending 1", "0/1 VMs running; starting 1", "0/1 VMs running; qemu-start 1",
         "0/1 VMs running; booting 1", "1/1 VMs running"]
    assert "\r" not in r.stderr and "\x1b" not in r.stderr


def test_quiet_shows_no_progress(site):
    r = site("-q", "batch", "--wait", "tiny:1")
    assert r.status == 0 and r.stderr == "", r.stderr


def test_the_transfer_bar_is_click_s_on_a_terminal_and_absent_elsewhere():
    """image import/export/copy draw click's bar on a terminal (one way to draw a bar: cp's too)."""
    import io
    from types import SimpleNamespace

    from pcocc.cli.progress import progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    app = SimpleNamespace(verbosity=0, env=SimpleNamespace(stderr=err, stderr_is_tty=lambda: True))
    with progress_bar(app, "importing disk.qcow2") as update:
        for p in (10, 50, 50, 120):
            update(p)
    assert "importing disk.qcow2" in err.getvalue() and "100%" in err.getvalue()
    quiet = SimpleNamespace(verbosity=-1, env=app.env)
    with progress_bar(quiet, "x") as update:
        assert update is None
    piped = SimpleNamespace(verbosity=0, env=SimpleNamespace(stderr=io.StringIO(), stderr_is_tty=lambda: False))
    with progress_bar(piped, "x") as update:
        assert update is None


def test_the_start_line_reads_the_cluster_only_through_wait_ready(site, monkeypatch):
    """batch --wait draws the phases from the records wait_ready follows: the CLI does not read
    the whole cluster again beside it (at 16,000 VMs, every 0.5 s)."""
    from fake_backend import FakeBackend

    reads = []
    real = FakeBackend.job
    monkeypatch.setattr(FakeBackend, "job", lambda self, jobid: reads.append(jobid) or real(self, jobid))
    r = site("batch", "--wait", "tiny:1")
    assert r.status == 0, r.stderr
    assert "booting 1" in r.stderr
    assert len(reads) == 5  # the stand-in's own five reads (one per phase), none by the CLI
