"""`pcocc internal launcher`: the body of a SLURM job that runs a virtual cluster.

Runs inside the allocation (salloc's command, or sbatch's script): records the
cluster in the store, starts the VMs with srun, waits for them, then runs the
user's shell or script, and ends the cluster after it.

Ending the VMs: srun turns a SIGTERM it receives into a SIGKILL of every task
("forcing job termination", srun(1)), which leaves a task no time to stop its
VM and remove its files. So the launcher sends srun SIGINT instead: the VM step
runs with --disable-status, under which srun forwards a single SIGINT to the
tasks (srun(1), -X); each task then stops its VM and cleans up (its SIGTERM
and SIGINT path). Only if they are not gone after STOP_GRACE does it fall back
to SIGTERM. What a SIGKILL still leaves (a scancel signals srun too) is removed
by the job's epilog on each node (the SPANK plugin's `setup delete`).
"""

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

from pcocc import phases, state
from pcocc.batch.base import agent_missing
from pcocc.batch.slurm import SlurmBackend, srun_vms
from pcocc.cluster import parse_definition
from pcocc.errors import PcoccError, PermissionDenied
from pcocc.hypervisor.vm import STOP_TIMEOUT
from pcocc.lifecycle.nodesetup import VM_FINAL_STATES
from pcocc.procs import shell_status

log = logging.getLogger("pcocc.lifecycle.launcher")

# Seconds the VM tasks have to stop once told (SIGINT): a VM's own stop takes up to
# STOP_TIMEOUT (ACPI powerdown, persistent drives) plus 5 s (quit), then the task removes
# its run dir and publishes its end; the rest is slack for a loaded node.
STOP_GRACE = STOP_TIMEOUT + 30
# then, after SIGTERM (srun SIGKILLs the tasks), seconds for srun to collect them
KILL_GRACE = 30


def run_launcher(ctx, definition, name, user_data=None, batch_script=None, host_script=None, interactive=False, info_out=print,
                 restart_dir=None, boot=False, overrides=None):
    """Run a virtual cluster in this SLURM allocation; its exit status (the shell's or script's).

    host_script: a command line (alloc -E, batch -E), split as a shell does;
    overrides: the cluster's --image/--mount ({"images", "mounts"},
    pcocc.templates.apply_overrides); a restart takes its checkpoint's instead.
    """
    from pcocc.templates import apply_overrides, snapshot_exclusions

    env = ctx.env.environ
    jobid = int(env["SLURM_JOB_ID"])
    backend = SlurmBackend(ctx)
    tset = ctx.config.templates
    vms = parse_definition(definition, tset)
    resolved = {n: tset.resolve(n) for n in {v.template for v in vms}}
    opts = {"name": name, "definition": definition, "user_data": user_data, "script": batch_script, "cwd": os.getcwd()}
    if restart_dir:  # `pcocc alloc|batch -r DIR` checked it; the files may have changed since
        from pcocc.lifecycle import checkpoint

        try:
            manifest = checkpoint.load(restart_dir)
            overrides = manifest.get("overrides") or None  # a restart keeps the checkpoint's images
            resolved = apply_overrides(resolved, overrides)
            checkpoint.check_restart(manifest, restart_dir, vms, resolved)
        except PcoccError as exc:
            info_out(f"pcocc: error: {exc.message}")
            return 1
        opts["restart"] = {"dir": restart_dir, "manifest": manifest}
    else:
        resolved = apply_overrides(resolved, overrides)
        if not boot and not user_data:
            opts["instant"] = _instant(ctx, resolved, info_out, snapshot_exclusions(resolved, overrides))
    opts["overrides"] = overrides
    prefix = state.cluster_prefix(ctx.env.user, jobid)
    pcocc_bin = os.path.join(os.path.dirname(sys.executable), "pcocc")
    srun = None
    stopping = []
    ended = {"error": None, "script": None, "status": None}  # how it ended, for its history record

    def on_signal(signum, frame):
        stopping.append(signum)
        if srun is not None:
            ask_to_stop(srun)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # scancel, Ctrl-C, salloc's allocation revoked
        signal.signal(signum, on_signal)
    try:
        # The VMs' step first: its node setup (root) gives a first-time user an etcd account,
        # and the VMs wait for the cluster's record, written as soon as we may.
        srun = srun_vms(pcocc_bin, len(vms))
        info_out("Configuring hosts...")  # the original's phase messages, which site scripts read
        _wait_for_store_access(ctx, prefix, lambda: srun.poll() is None and not stopping)
        backend.write_credentials(jobid, [])
        ctx.store.put(prefix + "info", backend.cluster_info(jobid, vms, resolved, opts, backend="slurm", rundir=None, launcher_host=ctx.hostname))

        # a batch script runs in vm0 through its agent; the shell and -E only need qemu to run
        until = "running" if batch_script else "qemu"
        # the phases as they change: a live line on salloc's terminal, a line per change in sbatch's output
        with phases.start_line(ctx.env.stderr, f"cluster {jobid}", info_out, until=until) as show:
            failed = wait_started(backend, jobid, lambda vms: show(vms=vms),
                                  alive=lambda: srun.poll() is None and not stopping, until=until)
        for vm in failed:
            info_out(f"pcocc: warning: cluster {jobid}: {vm['name']} failed: {vm.get('error') or 'no reason given'}")
        now = backend.job(jobid)[1]
        for vm in now:
            if vm.get("agent") == "none":
                info_out(f"pcocc: warning: {agent_missing(vm)}")
        if any(vm["state"] not in ("running", *VM_FINAL_STATES) for vm in now):
            info_out(f"cluster {jobid}: every qemu runs ({phases.summary(now)}); exec waits for the guests still booting")
        if failed and batch_script:
            raise PcoccError(f"cluster {jobid}: the batch script runs once every VM runs, and {failed[0]['name']} failed")
        if failed:
            info_out(f"cluster {jobid} goes on with {len(vms) - len(failed)} of its {len(vms)} VMs")
        ctx.store.update(prefix + "info", lambda i: {**i, "state": "running", "started": time.time()})
        if batch_script or host_script or interactive:
            from pcocc.lifecycle.allocshell import cluster_environ

            child_env = dict(env, **cluster_environ(ctx.env, jobid, name, *backend.job(jobid)))
            ended["script"] = "batch script" if batch_script else "host script" if host_script else "allocation's shell"
            status = run_user_part(backend, jobid, child_env, batch_script, host_script, pcocc_env=ctx.env)
        else:
            status = srun.wait()
        ended["status"] = status
        return shell_status(status)  # sys.exit(-15) would give 241, not 143
    except PcoccError as exc:
        ended["error"] = exc.message
        info_out(f"pcocc: error: {exc.message}")
        return 1
    finally:
        if srun is not None:
            info_out("Terminating the cluster...")
            stop_vms(srun)
        _record_end(ctx, jobid, stopping, ended, to_output=bool(batch_script))
        ctx.store.delete_prefix(prefix)


def run_user_part(backend, jobid, env, batch_script=None, host_script=None, out=None, err=None, pcocc_env=None):
    """Run what a cluster ends with; its exit status.

    batch_script: a script run in vm0 (batch -b), its output written to out and err
    (default: this process's stdout and stderr); host_script: a command line run here
    (alloc -E, batch -E; split as a shell does, as the original pcocc does); neither:
    the user's shell ($SHELL, else /bin/sh), its prompt showing the cluster
    (pcocc.lifecycle.allocshell; pcocc_env: pcocc's Environment, for its private files).
    With both, both run at once and the cluster ends with the batch script, as in the
    original pcocc: the host command, if it still runs then, is stopped (SIGTERM, then
    SIGKILL after HOST_SCRIPT_GRACE s). env: the environment of the command or shell.
    """
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    if not batch_script:
        gone = lambda: not backend.job_alive(jobid)  # noqa: E731
        if host_script:
            return call_while_alive(shlex.split(host_script), env, gone)
        from pcocc.lifecycle.allocshell import remove_rcfile, shell_command

        argv, shell_env, rcfile = shell_command(pcocc_env, jobid, env)
        try:
            return call_while_alive(argv, shell_env, gone)
        finally:
            remove_rcfile(rcfile)
    host = _popen(shlex.split(host_script), env) if host_script else None
    try:
        status, stdout, stderr = backend.run_script_in_vm(jobid, batch_script)
        out.write(stdout)
        err.write(stderr)
        out.flush()
        return status
    finally:
        if host is not None:
            _stop_host_command(host)


HOST_SCRIPT_GRACE = 10  # seconds a host command has to end after SIGTERM, once the batch script ended


JOB_GONE_CHECK = 15  # seconds between two questions to the batch system while the shell or -E runs


def call_while_alive(argv, env, gone=None):
    """subprocess.call, a command that cannot start being a PcoccError (127 or 126 by a shell's rule).

    gone: f() -> True once the cluster's job ended, asked every JOB_GONE_CHECK s; the command is
    then stopped as a host command is (SIGTERM, SIGKILL after HOST_SCRIPT_GRACE s), as salloc
    stops its command when its job is cancelled (not once salloc itself was killed: then nothing
    else would). The SLURM launcher and the local pcocc alloc run their shell or -E through it."""
    proc = _popen(argv, env)
    if gone is not None:
        import select

        ended = os.pidfd_open(proc.pid)  # readable once it exits: no polling in between
        try:
            while not select.select([ended], [], [], JOB_GONE_CHECK)[0]:
                try:
                    if gone():
                        _stop_host_command(proc)
                        break
                except PcoccError as exc:  # the store or batch system unreachable now: the session goes on
                    log.warning("cannot tell whether job is still there: %s", exc.message)
        finally:
            os.close(ended)
    return proc.wait()


def _popen(argv, env):
    try:
        return subprocess.Popen(argv, env=env)
    except OSError as exc:
        raise PcoccError(f"cannot run {argv[0]}: {exc.strerror}") from None


def _stop_host_command(proc):
    """SIGTERM to the command and every process it started (a script's children, a shell's
    jobs: they are not in a process group of their own, which would take the terminal's Ctrl-C
    from them), then SIGKILL to what is left after HOST_SCRIPT_GRACE s."""
    from pcocc.procs import descendants, pid_alive, process_start

    if proc.poll() is not None:
        return
    tree = [(proc.pid, process_start(proc.pid)), *descendants(proc.pid)]
    for pid, start in tree:
        if pid_alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(HOST_SCRIPT_GRACE)
    except subprocess.TimeoutExpired:
        pass
    for pid, start in tree:  # not descendants() again: once reaped, proc's pid may be another's
        if pid_alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()


def _record_end(ctx, jobid, signals, ended, to_output=False):
    """The cluster's history record (pcocc history), from what the launcher saw; a store
    error is logged (the cluster's records go all the same). to_output: also say it on
    stdout (a batch script's, which sbatch writes to pcocc_<job>.out, as on one host)."""
    from pcocc import history

    end_state, reason, code = history.launcher_end(signals, error=ended["error"], script=ended["script"], status=ended["status"])
    if end_state in (history.CANCELLED, history.COMPLETED):
        # a stop asked with its own end (pcocc ckpt: request_end) is neither a plain cancel nor VMs
        # that stopped by themselves
        with contextlib.suppress(PcoccError):
            request = (ctx.store.get(state.cluster_prefix(ctx.env.user, jobid) + "info") or {}).get("end_request")
            if isinstance(request, dict) and request.get("state") in history.END_STATES:
                end_state, reason, code = request["state"], request.get("reason") or reason, request.get("exit_code")
    if to_output:
        print(f"pcocc: cluster {jobid} ended: {end_state}" + (f" ({reason})" if reason else ""), flush=True)
    try:
        history.record_cluster(ctx.store, ctx.env.user, jobid, end_state, reason, code)
    except PcoccError as exc:
        log.warning("cluster %s: its end could not be recorded in the history: %s", jobid, exc.message)


def wait_started(backend, jobid, progress, alive, timeout=3600, until="running"):
    """Wait until every VM of the job runs or has ended; return the records of those that
    ended (failed or stopped), in rank order: the cluster goes on without them, as on the
    local backend (a VM whose qemu or task was killed is shown failed by ps).

    until: "running" (its guest agent answered, or it runs without one) or "qemu" (its
    qemu runs: the alloc shell and -E start then, as in the original; pcocc.phases.started).

    progress(vms): called with the VM records whenever a VM changes phase (pcocc.phases).
    alive(): whether the VM step still runs. Raises PcoccError when a node's setup failed,
    when every VM ended, or when the step ended first; TimeoutExpired after timeout s.
    """
    from pcocc.batch.base import POLL
    from pcocc.errors import NotFoundError, TimeoutExpired

    deadline, last = time.monotonic() + timeout, None
    # the cluster's records read once, then only their changes (a watch on etcd): each look
    # costs what changed, not the cluster's size
    with backend.watch_job(jobid) as view:
        while True:
            look = time.monotonic()
            if view.info is None:
                raise NotFoundError(f"no virtual cluster with job id {jobid}", "See 'pcocc ps'.")
            failed_node = view.failed_node()
            if failed_node:
                node, st = failed_node
                raise PcoccError(f"cluster {jobid}: node setup failed on {node}: {st.get('error', 'unknown reason')}")
            counts, total = view.counts(), view.count()
            ended = sum(counts.get(s, 0) for s in VM_FINAL_STATES)
            if total and ended == total:
                v = view.first_vm(VM_FINAL_STATES)
                raise PcoccError(f"cluster {jobid}: every VM ended before it ran ({v['name']}: {v.get('error') or v['state']})")
            if counts != last:
                progress(view.vms())
                last = counts
            if view.started(until) + ended == total:
                return [v for _, v in sorted(view.vm_records.items()) if v.get("state") in VM_FINAL_STATES]
            if not alive():
                raise PcoccError(f"cluster {jobid} ended before all its VMs ran")
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"cluster {jobid}: not every VM runs after {timeout} s")
            view.refresh(POLL)  # back at the first change
            time.sleep(max(0.0, look + POLL - time.monotonic()))  # at most one look per POLL: what comes meanwhile, in one batch


def ask_to_stop(srun):
    """SIGINT to the VM step's srun (once), which forwards it to every VM task (srun -X)."""
    if srun.poll() is None and not getattr(srun, "pcocc_stop_asked", False):
        srun.pcocc_stop_asked = True
        srun.send_signal(signal.SIGINT)


def stop_vms(srun, grace=STOP_GRACE, kill_grace=KILL_GRACE):
    """End the VM step: ask the tasks to stop (SIGINT), wait up to grace s; then SIGTERM
    (srun SIGKILLs them), wait up to kill_grace s; then SIGKILL srun itself."""
    if srun.poll() is not None:
        return
    ask_to_stop(srun)
    for signum, wait in ((None, grace), (signal.SIGTERM, kill_grace), (signal.SIGKILL, None)):
        if signum is not None:
            log.warning("the VM step did not end: sending srun signal %d", signum)
            with contextlib.suppress(ProcessLookupError):
                srun.send_signal(signum)
        try:
            srun.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue



def _instant(ctx, resolved, info_out, excluded=None):
    """{template: restore entry} of the templates whose snapshot can start their VMs (each VM checks its slice);
    excluded: {template: why its snapshot is not used} (pcocc.templates.snapshot_exclusions)."""
    from pcocc.lifecycle import instant

    out = {}
    images = ctx.images()
    for name, res in sorted(resolved.items()):
        entry, stale = instant.lookup(images, ctx.env, ctx.config, name, res, None, None)
        if (entry or stale) and name in (excluded or {}):
            info_out(f"template {name}: its snapshot is not used: {excluded[name]}")
        elif entry:
            out[name] = entry
        elif stale:
            info_out(f"template {name}: its snapshot cannot be used ({stale}): its VMs boot")
    if out:
        info_out(f"restoring the VMs of {', '.join(out)} from their template's snapshot")
    return out or None


def _wait_for_store_access(ctx, prefix, alive, timeout=300):
    """Return once the store lets us in (a first job's account is made by its node setup)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctx.store.get(prefix + "info")
            return
        except PermissionDenied:
            if not alive() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
