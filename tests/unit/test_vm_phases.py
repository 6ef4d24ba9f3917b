"""The phases a VM process publishes while it starts (lifecycle.vmrun): one store update per
phase, "booting" at the guest's first console output."""

import pytest

from pcocc.lifecycle.vmrun import _ConsoleQuiet


def test_first_console_output_is_told_once(tmp_path):
    log = tmp_path / "console.log"
    told = []
    quiet = _ConsoleQuiet(str(log), on_first_output=lambda: told.append(len(told)))
    quiet.since()  # no file yet
    log.write_bytes(b"")
    quiet.since()  # empty: the guest has said nothing
    assert told == []
    log.write_bytes(b"Linux version 6.1")
    quiet.since()
    log.write_bytes(b"Linux version 6.1\nmore")
    quiet.since()
    assert told == [0]


def test_the_silence_clock_restarts_on_output(tmp_path):
    log = tmp_path / "console.log"
    quiet = _ConsoleQuiet(str(log))
    first = quiet.since()
    assert quiet.since() == first  # nothing changed
    log.write_bytes(b"x")
    assert quiet.since() >= first


def test_summary_counts_phases_and_names_the_slowest():
    from pcocc.phases import summary

    vms = [{"name": "vm0", "state": "running", "since": 90.0}, {"name": "vm1", "state": "booting", "since": 95.0},
           {"name": "vm2", "state": "qemu-start", "since": 98.0}, {"name": "vm3", "state": "qemu-start", "since": 88.0}]
    assert summary(vms, now=100.0) == "1/4 VMs running; qemu-start 2, booting 1; slowest: vm3 qemu-start for 12 s"
    assert summary([{"name": "vm0", "state": "running"}], now=1.0) == "1/1 VMs running"
    assert summary([{"name": "vm0", "state": "pending"}], now=1.0) == "0/1 VMs running; pending 1"
    assert summary([{"name": "vm0", "state": "failed"}, {"name": "vm1", "state": "pending"}], now=1.0) == \
        "0/2 VMs running; pending 1, failed 1; slowest: vm1 pending"


def test_a_guest_without_agent_is_absent_after_the_silence_bound_not_failed(tmp_path, monkeypatch):
    """Images without qemu-guest-agent run, as in the original: the wait for the agent ends
    with AgentAbsent (the VM process then runs it with agent "none"), never a failed VM."""
    import threading
    from types import SimpleNamespace

    import pytest

    from pcocc.errors import PcoccError
    from pcocc.lifecycle import vmrun

    monkeypatch.setattr(vmrun, "AGENT_TIMEOUT", 0.5)
    log = tmp_path / "console.log"
    log.write_bytes(b"booted, no agent here\n")

    class NoAgent:
        def connect(self, deadline):
            raise PcoccError("no agent")

        def ping(self):
            raise AssertionError("never connected")

    vm = SimpleNamespace(config=SimpleNamespace(name="vm0", path=lambda name: str(tmp_path / name)),
                         proc=SimpleNamespace(poll=lambda: None),
                         monitor=SimpleNamespace(wait_event=lambda *a: False))
    with pytest.raises(vmrun.AgentAbsent, match="did not answer"):
        vmrun._wait_agent(NoAgent(), vm, threading.Event(), booting=False)


def test_a_late_agent_is_found_by_a_short_look():
    """A VM that runs with agent "none" is looked at again every AGENT_RECHECK s: each look is
    bounded (connect and ping with AGENT_PROBE), and one that answers makes the VM's record say so."""
    from pcocc.errors import PcoccError
    from pcocc.lifecycle import vmrun

    class Agent:
        def __init__(self, up):
            self.up, self.calls = up, []

        def connect(self, deadline=None, *, timeout=None):
            self.calls.append(("connect", timeout))
            if not self.up:
                raise PcoccError("no agent")
            return self

        def ping(self, timeout=None):
            self.calls.append(("ping", timeout))

    down, up = Agent(False), Agent(True)
    assert vmrun._agent_answers(down) is False and down.calls == [("connect", vmrun.AGENT_PROBE)]
    assert vmrun._agent_answers(up) is True and up.calls == [("connect", vmrun.AGENT_PROBE), ("ping", vmrun.AGENT_PROBE)]


def test_waiting_for_a_cluster_warns_of_vms_without_agent():
    from pcocc.batch.base import Backend

    class Fake(Backend):
        def __init__(self):
            pass

        def watch_job(self, jobid):  # the records below, as they are
            from pcocc.batch.base import JobView

            return JobView.of(*self.job(jobid))

        def job(self, jobid):
            return {"nodes": {}, "state": "running"}, [
                {"name": "vm0", "state": "running", "agent": "ready"},
                {"name": "vm1", "state": "running", "agent": "none", "agent_error": "the guest agent of vm1 did not answer"}]

    warned = []
    Fake().wait_ready(1, alive=lambda j: True, warn=warned.append)
    assert warned == ["vm1 runs without a guest agent (exec, save's freeze and ckpt need qemu-guest-agent in the image): "
                      "the guest agent of vm1 did not answer"]


def test_the_alloc_shell_waits_for_qemu_and_batch_wait_for_the_agents():
    """The original's rule: the shell and -E start once every qemu runs (until="qemu"); batch
    --wait and a batch script wait for the guest agents (until="running")."""
    from pcocc.batch.base import Backend
    from pcocc.errors import TimeoutExpired
    from pcocc.phases import started

    assert [started({"state": s}, "qemu") for s in ("starting", "qemu-start", "booting", "restoring", "running", "failed")] == \
        [False, True, True, True, True, False]
    assert [started({"state": s}) for s in ("booting", "running")] == [False, True]

    class Fake(Backend):
        def __init__(self):
            pass

        def watch_job(self, jobid):  # the records below, as they are
            from pcocc.batch.base import JobView

            return JobView.of(*self.job(jobid))

        def job(self, jobid):
            return {"nodes": {}, "state": "running"}, [{"name": "vm0", "state": "running"}, {"name": "vm1", "state": "booting"}]

    seen = []
    Fake().wait_ready(1, progress=lambda n, total, vms: seen.append((n, total)), alive=lambda j: True, until="qemu")
    assert seen == [(2, 2)]
    with pytest.raises(TimeoutExpired):
        Fake().wait_ready(1, alive=lambda j: True, timeout=0)


def test_a_run_dir_too_long_for_the_vm_s_sockets_is_said_in_one_line(tmp_path):
    """A long home (the ~/.cache fallback) or PCOCC_RUN_DIR: qemu would fail on 'Path must be
    less than 108 bytes' for every VM; the VM fails first, with the fix."""
    import pytest

    from pcocc.errors import PcoccError
    from pcocc.lifecycle import vmrun

    vmrun._check_socket_room("/tmp/pcocc-1000/job_12/vm0")
    with pytest.raises(PcoccError, match="too long for its sockets") as err:
        vmrun._check_socket_room("/home/" + "u" * 90 + "/.cache/pcocc/run-host/job_12/vm0")
    assert "PCOCC_RUN_DIR" in err.value.hint


def test_a_guest_booting_again_after_a_reset_is_looked_at_within_a_first_boots_bounds(tmp_path, monkeypatch):
    """lifecycle.vmrun._Reboot: a look every REBOOT_PROBE s; given up after AGENT_TIMEOUT s of
    console silence (its output moves the bound), or AGENT_TIMEOUT_MAX s in all (a fake clock)."""
    from types import SimpleNamespace

    from pcocc.lifecycle import vmrun

    now = [1000.0]
    monkeypatch.setattr(vmrun, "time", SimpleNamespace(monotonic=lambda: now[0]))  # vmrun's clock only
    console = tmp_path / "console.log"
    console.write_bytes(b"")
    vm = SimpleNamespace(config=SimpleNamespace(path=lambda name: str(tmp_path / name)))
    reboot = vmrun._Reboot(vm)
    assert not reboot.due()
    now[0] += vmrun.REBOOT_PROBE
    assert reboot.due() and not reboot.due()  # the next one planned a probe later
    now[0] += vmrun.AGENT_TIMEOUT - 1
    assert not reboot.expired()
    console.write_bytes(b"[    0.000000] Linux version")  # the kernel prints: the silence starts again
    assert not reboot.expired()
    now[0] += vmrun.AGENT_TIMEOUT - 1
    assert not reboot.expired()
    now[0] += 2
    assert reboot.expired()
    # a console that prints for ever: AGENT_TIMEOUT_MAX s in all
    reboot = vmrun._Reboot(vm)
    for i in range(vmrun.AGENT_TIMEOUT_MAX // vmrun.AGENT_TIMEOUT + 1):
        assert not reboot.expired()
        console.write_bytes(b"x" * (i + 100))
        reboot.expired()  # sees it grow
        now[0] += vmrun.AGENT_TIMEOUT - 1
    assert reboot.expired()


def test_a_reset_through_the_monitor_is_a_reset_too():
    """pcocc reset and monitor-cmd system_reset both tell the VM process (on_reset), whose
    record then says booting; other monitor commands do not."""
    from types import SimpleNamespace

    from pcocc.lifecycle.control import ControlHandler

    sent, resets = [], []
    monitor = SimpleNamespace(hmp=lambda command: sent.append(command) or "", cmd=lambda name, **a: sent.append(name) or {})
    handler = ControlHandler(SimpleNamespace(monitor=monitor, config=SimpleNamespace(name="vm0")), SimpleNamespace(),
                             on_reset=lambda: resets.append(1))
    handler.op_monitor_cmd("info version")
    assert resets == []
    handler.op_monitor_cmd("system_reset")
    handler.op_reset()
    assert sent == ["info version", "system_reset", "system_reset"] and resets == [1, 1]
