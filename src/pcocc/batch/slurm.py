"""The SLURM backend: a virtual cluster is an ordinary SLURM job.

`pcocc alloc|batch` run salloc/sbatch with one task per VM and, as the job's
command, `pcocc internal launcher`. The launcher (inside the allocation) records
the cluster in the store, starts `srun --vm pcocc internal run` (the SPANK
plugin sets up each node as root before the tasks start), waits for every VM,
then runs the user's shell or script and ends the cluster after it.
"""

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys

from pcocc import state
from pcocc.batch.base import Backend
from pcocc.errors import CommandError, NotFoundError, PermissionDenied
from pcocc.runner import run


JOB_COMMENT = "pcocc"  # marks virtual clusters among a user's jobs

log = logging.getLogger("pcocc.batch.slurm")


class SlurmBackend(Backend):
    def squeue(self, jobid=None, user=None, all_users=False):
        """{jobid: {name, user, state, nodes, partition, time, timelimit, pcocc}} of running or pending
        jobs: one job, a user's (default: ours), or every user's (all_users)."""
        # -a: hidden partitions too (their jobs are alive); the name last: it may hold a '|'
        argv = ["squeue", "-a", "-h", "-o", "%i|%u|%T|%N|%P|%M|%l|%k|%j"]
        if jobid:
            argv += ["-j", str(jobid)]
        elif not all_users:
            argv += ["-u", user or self.user]
        try:
            out = run(argv).stdout
        except CommandError as exc:
            if jobid and "Invalid job id" in exc.stderr:
                return {}
            raise
        jobs = {}
        for line in out.splitlines():
            jid, user, st, nodes, part, elapsed, limit, comment, name = line.split("|", 8)
            jobs[int(jid)] = {"name": name, "user": user, "state": st, "nodes": nodes, "partition": part,
                              "time": elapsed, "timelimit": limit, "pcocc": comment == JOB_COMMENT}
        return jobs

    def job_alive(self, jobid):
        """Whether SLURM runs (or will run, or is ending) the job; True when squeue cannot tell now
        (a busy slurmctld times out: MessageTimeout in slurm.conf(5)): the caller asks again later."""
        try:
            job = self.squeue(jobid).get(jobid)
        except CommandError as exc:
            log.warning("squeue: %s: assuming job %s still runs", exc.message, jobid)
            return True
        return job is not None and job["state"] in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING")

    def where_to_look(self, jobid):
        return f"See pcocc_{jobid}.out and pcocc_{jobid}.err where you submitted it."

    def jobs(self, user=None):
        """[(info, vms)] of a user's running pcocc jobs: squeue's view, with the store's for our own."""
        user = user or self.user
        running = self.squeue(user=user)
        readable = user == self.user
        if readable:
            try:
                self.reclaim(running)
            except PermissionDenied:  # no store account yet: the user's first node setup registers it
                readable = False
        out = []
        for jobid in sorted(running):
            job = running[jobid]
            if not readable:  # another user's records are not ours to read (or ours not yet)
                if job["pcocc"]:
                    out.append(_as_seen_by_slurm(jobid, job, user))
                continue
            try:
                info, vms = self.job(jobid)
            except NotFoundError:
                if job["pcocc"]:  # its launcher has not written its record yet (pending, starting)
                    out.append(_as_seen_by_slurm(jobid, job, user))
                continue
            out.append(({**info, "slurm": job}, vms))
        return out

    def all_jobs(self):
        """[(info, vms)] of every user's pcocc jobs (ps -a): ours as jobs() shows them, other users'
        as squeue(1) shows them (their store records are theirs to read)."""
        out = self.jobs()
        seen = {i["jobid"] for i, _ in out}
        for jobid, job in sorted(self.squeue(all_users=True).items()):
            if jobid not in seen and job["pcocc"]:
                out.append(_as_seen_by_slurm(jobid, job, job["user"]))
        return sorted(out, key=lambda j: j[0]["jobid"])

    def find(self, jobid=None, name=None):
        """As Backend.find; a job id of ours that SLURM knows as a pcocc job counts before its
        launcher wrote its record (so that it can be cancelled while pending or starting)."""
        if jobid is not None:
            try:
                self.job(jobid)
                return jobid
            except (NotFoundError, PermissionDenied):  # not recorded yet, or no store account yet
                try:
                    job = self.squeue(jobid).get(jobid)
                except CommandError:
                    job = None
                if job and job["user"] == self.user and job["pcocc"]:
                    return jobid
                raise
        return super().find(jobid, name)

    def reclaim(self, running):
        """Delete the store records of our clusters whose job is gone (a launcher that was killed),
        recording each end in the history (FAILED) first."""
        from pcocc import history

        prefix = state.clusters_prefix(self.user)
        gone = {int(k[len(prefix):].split("/")[0]) for k in self.ctx.store.range(prefix)} - set(running)
        for jobid in gone:
            if history.get(self.ctx.store, self.user, jobid) is None:  # its launcher did not record its end
                self.record_end(jobid, history.FAILED, "its job ended without its launcher recording the end (killed?)")
            self.ctx.store.delete_prefix(state.cluster_prefix(self.user, jobid))

    def cancel(self, jobid, wait=True, end_state="CANCELLED", reason=None, exit_code=None):
        """scancel the job; with wait, until SLURM forgets it (its tasks killed, its epilogs run),
        at most end_bound() seconds. end_state, reason, exit_code: what its history records
        (request_end; the launcher reads it)."""
        if end_state != "CANCELLED" or reason:
            self.request_end(jobid, end_state, reason, exit_code)
        run(["scancel", str(jobid)])
        if wait:
            self.wait_gone(jobid)

    def wait_gone(self, jobid):
        """Wait until SLURM forgets a cancelled job, at most end_bound() seconds."""
        import time

        deadline = time.monotonic() + end_bound()
        while time.monotonic() < deadline:
            try:
                if not self.squeue(jobid):
                    return
            except CommandError as exc:  # a busy slurmctld: ask again
                log.warning("squeue: %s", exc.message)
            time.sleep(0.5)

    def allocation_argv(self, command, n_vms, opts, passthrough):
        """salloc/sbatch arguments: admin's batch-args, the user's options, one task per VM."""
        settings = self.ctx.config.batch.settings
        argv = [command, "-J", opts["name"], f"--comment={JOB_COMMENT}", *settings["batch-args"], *passthrough, "-n", str(n_vms)]
        if opts.get("cpus"):
            argv += ["-c", str(opts["cpus"])]
        if opts.get("licenses"):
            argv += ["-L", ",".join(opts["licenses"])]
        return argv


    def check_definition(self, definition, restart=False, overrides=None):
        """What can be checked before sbatch/salloc: every template's image exists (Backend.check_images),
        with the cluster's --image and --mount applied (pcocc.templates.apply_overrides)."""
        if restart:
            return
        from pcocc.cluster import parse_definition
        from pcocc.templates import apply_overrides

        tset = self.ctx.config.templates
        vms = parse_definition(definition, tset)
        resolved = apply_overrides({n: tset.resolve(n) for n in {v.template for v in vms}}, overrides)
        self.check_images(vms, resolved, visible_only=True)

    def submit_batch(self, n_vms, definition, opts, passthrough):
        """sbatch a job whose script is the launcher; its job id."""
        self.check_definition(definition, bool(opts.get("restart_dir")), opts.get("overrides"))
        base = self.allocation_argv("sbatch", n_vms, self.with_licenses(definition, opts), passthrough)
        argv = base[:1] + ["--parsable", "--signal=15", "-o", "pcocc_%j.out", "-e", "pcocc_%j.err"] + base[1:]
        out = run(argv + ["--wrap", quote(launcher_argv(_pcocc_bin(), definition, opts))]).stdout
        return int(out.strip().split(";")[0])

    def interactive_allocation(self, n_vms, definition, opts, passthrough):
        """The salloc command line that runs the launcher (then the user's shell or script)."""
        if shutil.which("salloc") is None:
            raise NotFoundError("salloc not found: is SLURM's client installed on this host?")
        self.check_definition(definition, bool(opts.get("restart_dir")), opts.get("overrides"))
        extra = [] if opts.get("host_script") else ["--interactive"]
        argv = self.allocation_argv("salloc", n_vms, self.with_licenses(definition, opts), passthrough)
        return argv + launcher_argv(_pcocc_bin(), definition, opts) + extra

    def with_licenses(self, definition, opts):
        """opts plus the SLURM licenses the cluster's networks name (`license`: e.g. a PKey token)."""
        from pcocc.cluster import parse_definition
        from pcocc.networks.jobnet import licenses

        config = self.ctx.config
        templates = {vm.template for vm in parse_definition(definition, config.templates)}
        needed = licenses(config, [config.templates.resolve(t).values for t in sorted(templates)])
        return {**opts, "licenses": [*(opts.get("licenses") or []), *needed]} if needed else opts


def slurm_config():
    """{name: value} of `scontrol show config` ({} if it cannot be read)."""
    try:
        out = run(["scontrol", "show", "config"], timeout=60).stdout
    except CommandError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines()) if v}


def _seconds(text, default):
    """A value of `scontrol show config` in seconds ("30 sec", "65534" for unset: the default)."""
    try:
        value = int(str(text).split()[0])
    except (ValueError, IndexError):
        return default
    return default if value >= 65534 else value  # NO_VAL16: not set


def end_bound(config=None):
    """Seconds a cancelled job may take to leave squeue: KillWait (tasks signalled, then killed),
    UnkillableStepTimeout (processes killed but not gone yet) and PrologEpilogTimeout (the epilog,
    where the nodes are torn down), per slurm.conf(5), plus MessageTimeout for the messages;
    each with its documented default (30, 60, 10) or, for the epilog's unbounded default, 300 s."""
    config = slurm_config() if config is None else config
    return (_seconds(config.get("KillWait"), 30) + _seconds(config.get("UnkillableStepTimeout"), 60)
            + _seconds(config.get("PrologEpilogTimeout"), 300) + _seconds(config.get("MessageTimeout"), 10))


def _pcocc_bin():
    """The pcocc beside this interpreter: what jobs run must be this very installation."""
    return os.path.join(os.path.dirname(sys.executable), "pcocc")


def launcher_argv(pcocc_bin, definition, opts):
    argv = [pcocc_bin, "internal", "launcher", "--definition", definition, "--name", opts["name"]]
    if opts.get("user_data"):
        argv += ["--user-data", opts["user_data"]]
    if opts.get("script"):
        argv += ["--batch-script", opts["script"]]
    if opts.get("host_script"):
        argv += ["--host-script", opts["host_script"]]
    if opts.get("restart_dir"):
        argv += ["--restart-ckpt", opts["restart_dir"]]
    if opts.get("boot"):
        argv += ["--boot"]
    if opts.get("overrides"):
        argv += ["--overrides", json.dumps(opts["overrides"], sort_keys=True)]
    return argv


def quote(argv):
    return " ".join(shlex.quote(a) for a in argv)


def srun_vms(pcocc_bin, n_vms):
    """The step that runs the VMs: one task per VM, the SPANK plugin's --vm, no I/O forwarding.

    --disable-status: a single SIGINT to srun is forwarded to the tasks (srun(1), -X), which is
    how the launcher stops the VMs gracefully (a SIGTERM to srun SIGKILLs the tasks). srun has a
    process group of its own, so that a terminal's Ctrl-C reaches it once, through the launcher
    (two SIGINTs within a second make srun kill the tasks).
    """
    argv = ["srun", "--vm", "-n", str(n_vms), "--kill-on-bad-exit=0", "--disable-status", "--input=none", "--output=none",
            pcocc_bin, "internal", "run"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, process_group=0)


def _as_seen_by_slurm(jobid, job, user):
    """(info, vms) of a pcocc job known to SLURM only (another user's, or not recorded yet)."""
    return ({"jobid": jobid, "name": job["name"], "owner": user, "definition": "?", "state": job["state"].lower(),
             "created": None, "vms": [], "nodes": {}, "slurm": job}, [])
