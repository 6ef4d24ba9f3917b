"""A cluster's start on a terminal (tmux: send-keys, capture-pane, and pipe-pane for what was
drawn): a live line that shows the VMs' phases and ends on one line with every VM running; and an
alloc whose CLI is killed leaves no shell rc file behind. Against real VMs (local backend, qemu
under TCG, the tiny image). Content and order are asserted; the waits poll with a generous bound,
never a timing."""

import os
import re
import shlex
import signal
import time

import pytest

from local_site import PCOCC, LocalSite
from test_pty import WAIT, Tmux, lines

pytestmark = [pytest.mark.integration]

STARTING = ("pending", "starting", "restoring", "qemu-start", "booting")
_LINE = re.compile(r"cluster (\d+): (\d+/\d+ VMs (?:running|with qemu running)[^\r\n\x1b]*)")


@pytest.fixture
def site(tmp_path, tiny_image):
    s = LocalSite(tmp_path / "site", tiny_image)
    s.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    yield s
    s.cleanup()


@pytest.fixture
def term(tmp_path, site):
    t = Tmux(tmp_path, {**site.environ, "TERM": "xterm"})
    t.drawn = tmp_path / "drawn"  # every byte the pane was sent, carriage returns and escapes included
    t.tmux("pipe-pane", "-t", "t", "-o", f"cat >> {shlex.quote(str(t.drawn))}")
    yield t
    t.close()


def drawn_when(term, word):
    """What the pane was sent, once it holds word (pipe-pane writes it a little after the pane shows it)."""
    deadline = time.monotonic() + WAIT
    while True:
        text = term.drawn.read_bytes().decode("utf-8", "replace") if term.drawn.exists() else ""
        if word in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"pipe-pane never got {word!r}:\n{text!r}")
        time.sleep(0.2)


def phase_lines(text, jobid):
    """The successive states of the start line of cluster jobid, as drawn."""
    return [m.group(2) for m in _LINE.finditer(text) if m.group(1) == str(jobid)]


def phases_of(line):
    """The phases a state of the line counts ('0/1 VMs running; booting 1 (3 s)' -> ['booting'])."""
    head = line.rsplit(" (", 1)[0].split("; slowest")[0]
    parts = head.split("; ")
    return [p.rsplit(" ", 1)[0] for p in parts[1].split(", ")] if len(parts) > 1 else []


def test_batch_wait_shows_the_phases_on_one_live_line(site, term):
    term.wait_for(lambda t: "host$" in t, "the local prompt")
    term.keys(f"cd {shlex.quote(str(site.root))} && {PCOCC} batch -m 256 -J progress --wait tiny:1; echo status=$?", "Enter")
    text = term.wait_for(lambda t: any(line.startswith("status=") for line in lines(t)), "the end of batch --wait")
    shown = lines(text)
    assert "status=0" in shown, text
    jobid = next((line for line in shown if line.isdigit()), None)  # printed first, on stdout
    assert jobid, text
    # on the terminal, one line: every state of it was drawn over the one before
    final = [line for line in shown if line.startswith(f"cluster {jobid}: ")]
    assert len(final) == 1 and re.fullmatch(rf"cluster {jobid}: 1/1 VMs running \(\d+ s\)", final[0]), text
    assert shown.index(jobid) < shown.index(final[0]) < shown.index("status=0")

    states = phase_lines(drawn_when(term, "status=0"), jobid)
    assert len(states) >= 2 and states[-1].startswith("1/1 VMs running"), states
    assert all(s.startswith("0/1 VMs running; ") for s in states[:-1]), states
    seen = [p for s in states[:-1] for p in phases_of(s)]
    assert seen and all(p in STARTING for p in seen), states
    assert {"qemu-start", "booting"} & set(seen), states  # qemu runs while the guest boots: long enough to be seen
    order = [STARTING.index(p) for p in seen]
    assert order == sorted(order), states  # forward only


def test_a_killed_alloc_leaves_no_shell_rc_file(site, term):
    """The alloc shell's rc file (its "(pcocc/JOBID)" prompt) lives in the cluster's run dir: a
    SIGKILL of the CLI ends the cluster, whose cleanup removes it. Its start is a live line too."""
    term.wait_for(lambda t: "host$" in t, "the local prompt")
    term.keys(f"cd {shlex.quote(str(site.root))} && {PCOCC} alloc -m 256 tiny:1", "Enter")
    text = term.wait_for(lambda t: any(line.startswith("(pcocc/") for line in lines(t)), "the alloc shell's prompt")
    jobid = re.search(r"\(pcocc/(\d+)\) ", text).group(1)
    shown = lines(text)
    final = [line for line in shown if line.startswith(f"cluster {jobid}: ") and "VMs with qemu running" in line]
    assert len(final) == 1 and final[0].startswith(f"cluster {jobid}: 1/1 VMs with qemu running"), text
    assert shown.index(f"cluster {jobid} starting") < shown.index(final[0]) < \
        shown.index(f"cluster {jobid} ready: a shell in its allocation; exit it to end the cluster")

    term.keys("echo cli=$PPID", "Enter")  # the shell's parent: the alloc CLI
    text = term.wait_for(lambda t: re.search(r"^cli=\d+$", t, re.M), "the CLI's pid")
    cli = int(re.search(r"^cli=(\d+)$", text, re.M).group(1))
    rcfiles = [os.path.join(d, f) for d, _, files in os.walk(site.run_dir) for f in files if re.match(r"(bash|sh)rc", f)]
    assert rcfiles, list(os.walk(site.run_dir))  # the shell's, while it runs
    os.kill(cli, signal.SIGKILL)

    deadline = time.monotonic() + WAIT
    while site.pcocc("ps", "-j", jobid).returncode == 0:  # the cluster ends with its holder
        assert time.monotonic() < deadline, "the cluster outlived its alloc"
        time.sleep(0.5)
    assert [f for f in rcfiles if os.path.exists(f)] == []
    term.keys("exit", "Enter")  # the orphaned shell
