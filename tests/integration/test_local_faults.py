"""Faults on the local backend (issue 12, section 2): every process of a cluster may die at any
moment (SIGKILL, SIGHUP, Ctrl-C); what it owned is detected and cleaned, and `ps` tells the truth.

Each test drives real clusters (qemu under TCG here, the real supervisor and VM processes) and
checks what is left: qemu and pcocc processes, run dirs, records and reservations. The waits are
bounded polls of conditions, never fixed sleeps that a loaded machine could outrun.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from waiting import wait_for

from local_site import PCOCC, as_a_foreground_job

pytestmark = pytest.mark.integration

TPL = "tiny:\n  image: user:tiny\n"


def ps(site):
    r = site.pcocc("ps", "--json", check=True)
    return json.loads(r.stdout)


def record(site, key_suffix, jobid):
    items = site.store_items()
    value = items.get(f"/pcocc/users/{site.environ['USER']}/clusters/{jobid}/{key_suffix}")
    return json.loads(value) if value else None


def cluster_keys(site):
    return [k for k in site.store_items() if "/clusters/" in k]


def site_processes(site):
    """pids of the qemu and pcocc processes of this site (found by its run dir or its environment)."""
    tag = str(site.run_dir).encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if tag in cmd or b"PCOCC_RUN_DIR=" + tag in env.split(b"\0"):
            out.append(int(pid))
    return out


def reservations(site):
    """Reservations held in this site's host-wide directory (its own /dev/shm)."""
    from pcocc.batch.hostres import HostReservations

    return HostReservations(str(site.reservations)).all_live()


def nothing_left(site):
    return not site_processes(site) and not cluster_keys(site) and not reservations(site) and not list(site.run_dir.glob("job_*"))


def assert_nothing_left(site, what):
    wait_for(lambda: nothing_left(site), timeout=120,
             what=f"nothing left after {what} (processes {site_processes(site)}, keys {cluster_keys(site)}, "
                  f"reservations {reservations(site)}, run dirs {list(site.run_dir.glob('job_*'))})")


def start(site, n=1, *extra):
    site.write(".pcocc/templates.yaml", TPL)
    r = site.pcocc("batch", "-m", "256", *extra, "--wait", f"tiny:{n}")
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def test_sigkill_of_the_supervisor_leaves_no_vm_running(site):
    """r06 and r13: the VM processes and qemus die with their supervisor; ps reclaims the rest,
    and no VM process writes its record back once the cluster is gone."""
    jobid = start(site, 2)
    info = record(site, "info", jobid)
    vms = [record(site, f"vms/{r}", jobid) for r in (0, 1)]
    os.kill(info["supervisor"], signal.SIGKILL)
    for vm in vms:  # the qemus go by themselves, before anyone asks
        wait_for(lambda vm=vm: not os.path.exists(f"/proc/{vm['qemu_pid']}") or _zombie(vm["qemu_pid"]),
                 what=f"{vm['name']}'s qemu to die with its supervisor")
    assert ps(site) == []
    assert_nothing_left(site, "a SIGKILLed supervisor")


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_vm_process_shows_failed_and_the_cluster_goes_on(site):
    """r20: SIGKILL of one VM's process: that VM is failed with the reason, its qemu is gone,
    the other VM runs on; cancel leaves nothing."""
    jobid = start(site, 2)
    vm1 = record(site, "vms/1", jobid)
    os.kill(vm1["pid"], signal.SIGKILL)
    job = wait_for(lambda: next((j for j in ps(site) if j["vm_states"]["vm1"] == "failed"), None), what="vm1 failed")
    assert "killed by signal 9" in job["errors"]["vm1"]
    assert job["vm_states"]["vm0"] == "running"
    wait_for(lambda: _zombie(vm1["qemu_pid"]), what="vm1's qemu gone")
    r = site.pcocc("exec", "-w", "vm0", "echo alive")
    assert r.returncode == 0 and "alive" in r.stdout
    assert site.pcocc("cancel").returncode == 0
    assert_nothing_left(site, "cancel")


def test_a_vm_process_killed_while_qemu_starts_fails_the_wait(site):
    """r08: the VM's process dies before it recorded its qemu: batch --wait ends with the reason,
    and the qemu dies with it (nothing left once cancelled)."""
    site.write(".pcocc/templates.yaml", TPL)
    proc = subprocess.Popen([str(PCOCC), "batch", "-m", "256", "--wait", "tiny:1"], env=site.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=site.root,
                            preexec_fn=as_a_foreground_job)
    try:
        jobid = int(proc.stdout.readline())

        def vm_process_with_a_child():
            vm = record(site, "vms/0", jobid)
            if vm and vm["state"] in ("starting", "qemu-start", "booting") and _children(vm["pid"]):
                return vm
            return None

        vm = wait_for(vm_process_with_a_child, timeout=300, interval=0.02, what="vm0's process to start a child (the probe or qemu)")
        children = _children(vm["pid"])
        os.kill(vm["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert "vm0 failed" in err and "killed by signal 9" in err, err
        for child in children:
            wait_for(lambda child=child: _zombie(child), what=f"vm0's child {child} to die with it")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    site.pcocc("cancel", "-j", jobid)
    assert_nothing_left(site, "cancel")


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_a_supervisor_killed_while_ending_is_not_listed_for_ever(site):
    """r12: SIGTERM starts the end, SIGKILL interrupts it: the next ps reclaims the cluster."""
    jobid = start(site, 1)
    info = record(site, "info", jobid)
    os.kill(info["supervisor"], signal.SIGTERM)
    wait_for(lambda: (record(site, "info", jobid) or {}).get("state") == "ending" or not record(site, "info", jobid),
             interval=0.005, what="the cluster to be ending")
    os.kill(info["supervisor"], signal.SIGKILL)
    wait_for(lambda: _zombie(info["supervisor"]), what="the supervisor gone")
    assert ps(site) == []
    assert_nothing_left(site, "a supervisor killed while ending")


def test_ctrl_c_of_a_submission_stops_what_it_started(site):
    """r07: batch is held (SIGSTOP, as on a loaded node or after Ctrl-Z) until vm0 runs, then gets
    Ctrl-C: the submission is cancelled whole, nothing runs hidden."""
    site.write(".pcocc/templates.yaml", TPL)
    proc = subprocess.Popen([str(PCOCC), "batch", "-m", "256", "tiny:1"], env=site.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=site.root,
                            preexec_fn=as_a_foreground_job)
    try:
        wait_for(lambda: list(site.run_dir.glob("job_*/supervisor.log")), interval=0.001, what="the supervisor to start")
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: (record(site, "vms/0", 1) or {}).get("state") == "running", timeout=300, what="vm0 running")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert out.strip() == ""  # no job id: nothing was submitted
    assert_nothing_left(site, "an interrupted submission")


def test_ctrl_c_of_batch_wait_says_the_cluster_goes_on(site):
    """As sbatch: once the job id is printed, Ctrl-C stops the waiting, not the cluster."""
    site.write(".pcocc/templates.yaml", TPL)
    proc = subprocess.Popen([str(PCOCC), "batch", "-m", "256", "--wait", "tiny:1"], env=site.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=site.root,
                            preexec_fn=as_a_foreground_job)
    jobid = int(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"cluster {jobid} goes on" in err
    wait_for(lambda: [j for j in ps(site) if j["vm_states"].get("vm0") == "running"], timeout=300, what="the cluster to run")
    assert site.pcocc("cancel", "-j", jobid).returncode == 0
    assert_nothing_left(site, "cancel")


@pytest.mark.parametrize("when", ["run dir", "record"])
def test_a_submission_killed_midway_leaves_nothing(site, when):
    """r11: batch SIGKILLed during its submission: what it made is reclaimed by the next command."""
    site.write(".pcocc/templates.yaml", TPL)
    proc = subprocess.Popen([str(PCOCC), "batch", "-m", "256", "tiny:1"], env=site.environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=site.root)
    try:
        if when == "run dir":
            wait_for(lambda: list(site.run_dir.glob("job_*")) or proc.poll() is not None, interval=0.0005, what="a run dir")
        else:
            wait_for(lambda: cluster_keys(site) or proc.poll() is not None, interval=0.0005, what="a record")
    finally:
        proc.kill()
        proc.wait()
    # whatever it had made runs down or is reclaimed by the next look
    wait_for(lambda: ps(site) == [] and nothing_left(site), timeout=120, what="nothing left of the killed submission")


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL])
def test_the_cluster_ends_with_alloc_however_alloc_ends(site, sig):
    """r09: the terminal closes (SIGHUP), alloc is terminated or killed: its cluster ends too."""
    site.write(".pcocc/templates.yaml", TPL)
    shell = site.root / "shell.sh"
    shell.write_text("#!/bin/sh\necho ready\nsleep 600\n")
    shell.chmod(0o755)
    # SIGHUP's default action, whatever this run inherited (under nohup, alloc would ignore it, rightly)
    proc = subprocess.Popen(["env", "--default-signal=HUP", str(PCOCC), "alloc", "-m", "256", "-E", str(shell), "tiny:1"],
                            env=site.environ, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=site.root,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # the script runs once the cluster does
        assert [j["state"] for j in ps(site)] == ["running"]
        os.killpg(proc.pid, sig)  # what a terminal does to its foreground job when it goes away
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert_nothing_left(site, f"alloc ended by {signal.Signals(sig).name}")
