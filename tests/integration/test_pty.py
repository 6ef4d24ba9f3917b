"""exec --pty in a real terminal (tmux: send-keys, capture-pane) against a real VM (local backend,
qemu under TCG, the tiny image's stock qemu-guest-agent and util-linux script). Content and
order are asserted; the waits poll the pane with a generous bound, never a timing."""

import shlex
import subprocess
import time

import pytest

from local_site import PCOCC, LocalSite

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("pty-cluster")]

WAIT = 300  # seconds at most for the pane to show what a step expects (a loaded TCG host)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_image):
    site = LocalSite(tmp_path_factory.mktemp("pty"), tiny_image)
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    try:
        r = site.pcocc("batch", "-m", "256", "-J", "pty", "--wait", "tiny:1")
        assert r.returncode == 0, r.stderr
        site.jobid = r.stdout.strip()
        yield site
    finally:
        site.cleanup()


class Tmux:
    """A tmux server of its own (socket in tmp_path), one 100x30 pane running a plain local sh."""

    def __init__(self, tmp_path, env):
        self.sock = str(tmp_path / "tmux.sock")
        rc = tmp_path / "shell"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
        rc.write_text(f"#!/bin/sh\n{exports}export PS1='host$ '\nexec sh -i\n")
        rc.chmod(0o755)
        self.tmux("new-session", "-d", "-x", "100", "-y", "30", "-s", "t", str(rc))
        self.pid = int(self.tmux("display-message", "-p", "-t", "t", "#{pid}").strip())

    def tmux(self, *args):
        return subprocess.run(["tmux", "-S", self.sock, *args], check=True, capture_output=True, text=True).stdout

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "t", *keys)

    def pane(self):
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, predicate, what):
        deadline = time.monotonic() + WAIT
        while True:
            text = self.pane()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the pane never showed {what}:\n{text}")
            time.sleep(0.2)

    def close(self):
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True)
        try:
            import os
            import signal

            os.kill(self.pid, signal.SIGKILL)  # the server, by its pid, should kill-server have failed
        except ProcessLookupError:
            pass


@pytest.fixture
def term(tmp_path, cluster):
    t = Tmux(tmp_path, {**cluster.environ, "TERM": "xterm"})
    yield t
    t.close()


def lines(text):
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def test_a_guest_shell_on_a_terminal(cluster, term):
    term.wait_for(lambda t: "host$" in t, "the local prompt")
    term.keys(f"cd {shlex.quote(str(cluster.root))} && {PCOCC} exec --pty -j {cluster.jobid} -w vm0 sh", "Enter")
    term.wait_for(lambda t: lines(t)[-1:] in (["#"], ["$"]), "the guest's prompt")
    term.keys("stty size; echo $((6*7))", "Enter")
    text = term.wait_for(lambda t: "42" in lines(t), "42")
    assert "30 100" in lines(text)  # the window's size, given at start
    term.keys("sleep 1000", "Enter")
    term.wait_for(lambda t: lines(t)[-1].endswith("sleep 1000"), "sleep running")
    term.keys("C-c")  # to the guest's command, not to pcocc
    # the guest shell's prompt first: keys typed ahead are echoed before it, and the command's
    # output then lands on the prompt's line (seen under load: "# still-2")
    term.wait_for(lambda t: lines(t)[-1] in ("#", "$") and any(l.startswith("^C") for l in lines(t)),
                  "the guest's prompt after Ctrl-C")
    term.keys("echo still-$((1+1))", "Enter")
    term.wait_for(lambda t: "still-2" in lines(t), "the guest shell after Ctrl-C")
    term.keys("exit 5", "Enter")
    term.wait_for(lambda t: lines(t)[-1] == "host$", "the local prompt again")
    term.keys("echo status=$?", "Enter")
    text = term.wait_for(lambda t: "status=5" in lines(t), "the guest shell's status")
    order = lines(text)
    assert order.index("42") < order.index("still-2") < order.index("status=5")


def test_the_original_s_shell_command_is_a_login_shell_on_a_terminal(cluster, term):
    """pcocc shell [-s SHELL] [LOGIN@]vmN (the original's pcocc-shell(1)): exec --pty with a login shell."""
    term.wait_for(lambda t: "host$" in t, "the local prompt")
    # nobody's login shell is nologin: -s names one
    term.keys(f"cd {shlex.quote(str(cluster.root))} && {PCOCC} shell -j {cluster.jobid} -s sh nobody@vm0", "Enter")
    term.wait_for(lambda t: lines(t)[-1:] in (["#"], ["$"]) or lines(t)[-1].endswith(("$", "#")), "the guest's prompt")
    term.keys("echo user=$(id -un)", "Enter")
    term.wait_for(lambda t: "user=nobody" in lines(t), "the login's name")
    term.keys("exit 3", "Enter")
    term.wait_for(lambda t: lines(t)[-1] == "host$", "the local prompt again")
    term.keys(f"{PCOCC} shell -j {cluster.jobid}", "Enter")  # vm0, as root, root's login shell
    term.wait_for(lambda t: lines(t)[-1].endswith("#"), "root's prompt")
    term.keys("echo uid=$(id -u)", "Enter")
    term.wait_for(lambda t: "uid=0" in lines(t), "root's uid")
    term.keys("exit", "Enter")
    term.wait_for(lambda t: lines(t)[-1] == "host$", "the local prompt once more")
    term.keys("echo status=$?", "Enter")
    text = term.wait_for(lambda t: "status=0" in lines(t), "the status of the second shell")
    order = lines(text)
    assert order.index("user=nobody") < order.index("uid=0") < order.index("status=0")
