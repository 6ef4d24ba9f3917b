"""pcocc save, ckpt: a VM's disk as a new image revision; a whole cluster to a directory."""

import contextlib
import os
import time

import click

from pcocc.cli.access import Targets, job_options
from pcocc.cli.core import pass_app
from pcocc.cli.render import dump_json
from pcocc.agent.endpoint import DEFAULT_TIMEOUT
from pcocc.errors import NotFoundError, PcoccError


@click.command()
@job_options
@click.option("-d", "--dest", metavar="[REPO:]NAME", help="Save as a new image instead of a new revision of the VM's image.")
@click.option("--full", is_flag=True, help="Write a standalone image (no backing layers); always so for -d in another repository.")
@click.option("-s", "--safe", is_flag=True, help="Wait as long as it takes for the guest agent to freeze the file systems (and fail if it cannot).")
@click.option("-i", "--drive", "drive", type=click.IntRange(min=0), default=None, metavar="N",
              help="Copy persistent drive N (0: the first of its template) instead, to its 'backup' path or to -d PATH.")
@click.option("--json", "as_json", is_flag=True, help="Print what was saved as JSON.")
@click.argument("vm", default="vm0")
@pass_app
def save(app, jobid, jobname, dest, full, safe, drive, as_json, vm):
    """Save the disk of VM (default vm0) as a new revision of its image.

    Only what the VM changed is written: a new layer on the revision the VM
    started from, published as the image's next revision, which new VMs of
    the image use. The guest's file systems are frozen through its agent
    while the copy starts (a few milliseconds to seconds); without the agent,
    the disk is saved anyway, with a warning. Persistent drives are used in
    place and are not part of the image ('pcocc ckpt' copies them whole);
    with -i N, drive N is copied whole, while the VM runs, to the drive's
    'backup' path in its template (or -d PATH), which the copy replaces only
    once it is complete.
    """
    if drive is not None:
        return _save_drive(app, jobid, jobname, drive, dest, full, safe, as_json, vm)
    targets = Targets(app, jobid, jobname, vm)
    check_saveable(targets.info)
    if dest is not None:  # checked here first, for a plain answer (the VM's side checks again)
        from pcocc.images.repo import ImageExists

        repo, image_name = app.ctx.images().target(dest)
        if repo.revisions(image_name):
            raise ImageExists(f"image '{repo.name}:{image_name}' already exists", "Delete it first, or choose another name.")
    if len(targets.ranks) != 1:
        raise click.BadParameter("save one VM at a time", param_hint="'VM'")
    name = targets.vms[targets.ranks[0]]["name"]
    app.info(f"{name}: saving its disk{' (full image)' if full else ''}...")
    res = _call_vm(app, targets, name, "save interrupted: the VM abandons it, unless it was publishing it already "
                   "(see 'pcocc image list')", "save", dest=dest, full=full, safe=safe)
    if as_json:
        return dump_json(app, res)
    if res.get("frozen"):
        app.info(f"{name}: file systems frozen for {res.get('frozen_seconds', 0):.2f} s")
    app.info(f"{name}: disk saved as {res['uri']} ({_size(res['layer_bytes'])} written in {res['seconds']:.1f} s"
             f"{', standalone' if res['full'] else ', on ' + res['base']})")
    app.out(res["uri"])


def check_saveable(info):
    """PcoccError unless the disks of the cluster recorded as info may be saved: a cluster
    started with alloc/batch --image may not (the original pcocc's rule: its VMs' disks are
    not revisions of their templates' images)."""
    images = (info.get("overrides") or {}).get("images")
    if images:
        what = ", ".join(f"{t}={i}" for t, i in sorted(images.items()))
        raise PcoccError(f"cluster {info.get('jobid')} was started with --image ({what}): its disks cannot be saved",
                         "Checkpoint it with 'pcocc ckpt', or start it without --image from a template of that image.")


def _call_vm(app, targets, name, interrupted, op, **args):
    """The result of a save-like op of the VM; its warnings said; on Ctrl-C, `interrupted` said
    (our connection is closed by then: the VM abandons the work)."""
    try:
        res = targets.call_one(op, **args)
    except KeyboardInterrupt:
        app.warn(f"{name}: {interrupted}")
        raise
    for w in res.get("warnings", []):
        app.warn(f"{name}: {w}")
    return res


def _save_drive(app, jobid, jobname, drive, dest, full, safe, as_json, vm):
    """save -i N: a copy of persistent drive N, written on the VM's host."""
    if full:
        raise click.UsageError("--full is for image disks: a drive copy (-i) is always whole")
    targets = Targets(app, jobid, jobname, vm)
    if len(targets.ranks) != 1:
        raise click.BadParameter("save one VM at a time", param_hint="'VM'")
    name = targets.vms[targets.ranks[0]]["name"]
    target = os.path.abspath(dest) if dest else None
    app.info(f"{name}: copying persistent drive {drive}...")
    res = _call_vm(app, targets, name, "copy interrupted: the VM abandons it, the previous backup stays as it was",
                   "save_drive", index=drive, target=target, safe=safe)
    if as_json:
        return dump_json(app, res)
    app.info(f"{name}: drive {drive} ({res['path']}) copied to {res['target']} ({_size(res['bytes'])} in {res['seconds']:.1f} s)")
    app.out(res["target"])


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@click.command()
@job_options
@click.option("-F", "--force", is_flag=True, help="Replace DIR if it holds a checkpoint (and nothing else).")
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoint's manifest as JSON.")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@pass_app
def ckpt(app, jobid, jobname, force, as_json, directory):
    """Checkpoint a whole cluster into DIR (disks and memory), then stop it.

    Every VM is paused, then writes its disk changes, a whole copy of its
    persistent drives and its memory into DIR; the cluster stops once the
    checkpoint is complete and on disk (if anything fails before, or this
    command is interrupted, the cluster goes on as before and DIR is not
    written). -F replaces DIR only if it holds a pcocc checkpoint. Restart it with 'pcocc batch -r DIR' or
    'pcocc alloc -r DIR': the definition, cores and memory per VM are the
    checkpoint's unless given. VMs with 9p mount points or passthrough
    devices (InfiniBand, PCI) cannot be checkpointed.

    DIR must be reachable from every node the cluster runs on.
    """
    from pcocc.lifecycle import checkpoint

    directory = os.path.abspath(directory)
    if os.path.lexists(directory):
        if not force:
            raise click.BadParameter(f"{directory} exists already (-F replaces it)", param_hint="'DIR'")
        checkpoint.check_replaceable(directory)  # -F replaces a checkpoint, nothing else
    targets = Targets(app, jobid, jobname, "all")
    started = time.monotonic()
    overrides = targets.info.get("overrides")  # a restart keeps the images the cluster ran on
    manifest = take_checkpoint(app, targets, directory, force, {"overrides": overrides} if overrides else None)
    with contextlib.suppress(NotFoundError):  # it ends by itself once its VMs stopped
        app.ctx.backend().cancel(targets.jobid, end_state="COMPLETED", reason=f"checkpointed to {directory}")
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    if as_json:
        return dump_json(app, {**manifest, "directory": directory, "seconds": round(time.monotonic() - started, 3), "bytes": total})
    app.info(f"cluster {targets.jobid} checkpointed to {directory} ({total / 2**20:.1f} MiB, {time.monotonic() - started:.1f} s) and stopped")
    for line in restart_hint(directory, manifest):
        app.info(line)


def restart_hint(directory, manifest):
    """The lines that tell how to restart a checkpoint: commands that work when pasted (the
    definition, cores and memory come from the checkpoint: pcocc.cli.cluster.restart_options)."""
    import shlex

    from pcocc.lifecycle.checkpoint import slice_cores

    sizes = sorted({(slice_cores(vm), vm.get("memory_mb")) for vm in manifest.get("vms") or []}, key=str)
    what = f"definition {manifest['definition']}"
    if len(sizes) == 1:
        vcpus, memory_mb = sizes[0]
        what += f", {vcpus} core(s) and {memory_mb} MiB per VM"
    quoted = shlex.quote(directory)
    return [f"restart it with: pcocc batch -r {quoted}", f"  or, with a shell in its allocation: pcocc alloc -r {quoted}",
            f"  (its {what} come from the checkpoint; batch options such as a partition are given again as usual)"]


def take_checkpoint(app, targets, directory, force, extra=None):
    """Pause every VM of targets, write their state into directory, stop them; the manifest.

    Order (see pcocc.lifecycle.checkpoint): pause all, each VM writes and fsyncs its
    files in a staging directory, the manifest last, the directory published (the
    old checkpoint exchanged atomically with -F), and only then the VMs quit. On a
    failure before that, every VM resumes and directory is untouched. Each VM's part
    is one stream (its op ckpt), reached through the host relays as exec is
    (agent.relay): if this process dies, each VM sees its stream end and resumes.
    SIGTERM and SIGHUP interrupt it as Ctrl-C does: the VMs resume, nothing is left.
    """
    from pcocc.lifecycle import checkpoint

    from pcocc.cli.access import not_running

    checkpoint.check_cluster(app.config, targets.info)
    down = [not_running(v) for v in targets.vms if v.get("state") != "running"]
    if down:
        raise PcoccError(f"cannot checkpoint cluster {targets.jobid}: {'; '.join(down)}")
    if force:
        checkpoint.check_replaceable(directory)
    with _terminations_interrupt():
        return _take_checkpoint(app, checkpoint, targets, directory, force, extra)


def _take_checkpoint(app, checkpoint, targets, directory, force, extra):
    started = time.monotonic()
    staging = checkpoint.staging_dir(directory)
    vms = None
    paused = False
    try:
        vms = _Streams(targets)
        app.info(f"cluster {targets.jobid}: pausing {len(targets.ranks)} VM(s)")
        paused = True
        _all_ok(_older(vms.next("paused", timeout=DEFAULT_TIMEOUT)), "pause")
        app.info(f"cluster {targets.jobid}: writing disks and memory to {directory}")
        vms.send({"save": staging})
        # the first failure is enough: the others are told to resume (and give their saves up) at once
        saved = _all_ok(vms.next("saved", timeout=None, until_failure=True), "checkpoint")
        by_rank = {int(n[2:]): r for n, r in saved.items()}
        try:
            manifest = checkpoint.write_manifest(staging, targets.info, by_rank, None, extra)
            checkpoint.publish(staging, directory, force)
        except checkpoint.CheckpointError as exc:
            raise PcoccError(f"checkpoint failed: {exc.message}", "The cluster goes on as it was; nothing was written.") from None
        staging = None
        app.info(f"cluster {targets.jobid}: checkpoint written ({time.monotonic() - started:.1f} s): stopping the VMs")
        paused = False  # from the quit on, a VM that does not stop is cancelled with the cluster
        vms.send({"quit": True})
        try:
            stopped = vms.next(None, timeout=DEFAULT_TIMEOUT)
        except KeyboardInterrupt:
            app.warn(f"interrupted while the VMs stop: the checkpoint in {directory} is complete; "
                     "a VM that did not stop yet stops with the cluster")
            raise
        for name, (ok, res) in stopped.items():
            if not ok:
                app.warn(f"{name}: did not stop after the checkpoint ({res}); it stops with the cluster")
        _check_drive_stamps(app, checkpoint, directory, targets, by_rank, stopped, manifest, extra)
        return manifest
    finally:
        try:
            if paused:  # a failure before the checkpoint was whole: the cluster goes on as it was
                vms.send({"resume": True})
                for name, (ok, res) in vms.next(None, timeout=DEFAULT_TIMEOUT).items():
                    if not ok:  # its own failure (it resumed after it), or its resume's
                        app.warn(_named(name, res))
        finally:  # also after a second Ctrl-C during that wait
            if vms is not None:
                vms.close()  # a VM still paused (no answer above) resumes as its stream ends
            if staging:  # once the VMs answered (or were left): none writes there any more
                checkpoint.discard_staging(staging)


def _check_drive_stamps(app, checkpoint, directory, targets, by_rank, stopped, manifest, extra):
    """Persistent drives are stamped (size, mtime) when saved; if qemu's quit touched one,
    the manifest is rewritten with the new stamp (else the restart would refuse it)."""
    stamps = {int(n[2:]): r for n, (ok, r) in stopped.items() if ok}
    changed = any((d.get("size"), d.get("mtime_ns")) != (s["size"], s["mtime_ns"])
                  for rank, r in stamps.items() for s in r.get("drives", [])
                  for d in by_rank[rank].get("drives", []) if d["path"] == s["path"])
    if not changed:
        return
    try:
        manifest.update(checkpoint.write_manifest(directory, targets.info, by_rank, stamps, extra))
    except checkpoint.CheckpointError as exc:
        app.warn(f"a persistent drive changed as its VM stopped, and the manifest could not say so ({exc.message}): "
                 "the restart will ask for the drive copies of the checkpoint")


@contextlib.contextmanager
def _terminations_interrupt():
    """SIGTERM and SIGHUP (a closed terminal, a killed session) interrupt as Ctrl-C does for
    the block: its cleanup runs (the VMs resumed, the staging directory removed)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    saved = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class _Streams:
    """Every VM's checkpoint stream (the op ckpt of lifecycle.control), through the host
    relays (agent.relay.Fanout), for a whole checkpoint."""

    def __init__(self, targets):
        from pcocc.agent import relay

        running = [targets.vms[r] for r in targets.ranks]
        self.fanout = relay.Fanout(relay.plan(running), "ckpt", {}, open_timeout=DEFAULT_TIMEOUT,
                                   connect=lambda link, timeout: targets.connect(link["address"], timeout)).start()
        self.ended = {}  # VM name: (ok, its result or error), once its stream ended

    def send(self, message):
        """message to every VM whose stream goes on."""
        self.fanout.send("all", message)

    def next(self, key, timeout, until_failure=False):
        """{VM name: (ok, value)} for every VM whose stream went on: its next event's value
        under key (key None: its stream's end, its result), or (False, why) if its stream
        ended otherwise or nothing came within timeout seconds (None: no bound).
        until_failure: returns at the first (False, why), without waiting for the others."""
        waiting = set(self.fanout.by_name) - set(self.ended)
        got = {}
        end = None if timeout is None else time.monotonic() + timeout
        while waiting - set(got) and not (until_failure and any(not ok for ok, _ in got.values())):
            left = 1.0 if end is None else end - time.monotonic()
            if left <= 0:
                for name in waiting - set(got):
                    got[name] = (False, f"no answer within {timeout:g} s")
                break
            items, _ = self.fanout.pump(min(1.0, left))
            for item in items:
                name = item["vm"]
                if "event" in item:
                    if key is not None and name not in got and key in (item["event"] or {}):
                        got[name] = (True, item["event"][key])
                    continue
                self.ended[name] = (True, item["result"]) if "result" in item else (False, str(item.get("error")))
                if name not in got:
                    ok, value = self.ended[name]
                    got[name] = (ok, value) if key is None else (False, value if not ok else "its checkpoint ended early")
        return got

    def close(self):
        self.fanout.close()


def _older(results):
    """results, or the error that a VM process of an older pcocc (without the op ckpt) gets."""
    old = sorted(n for n, (ok, r) in results.items() if not ok and "unknown operation 'ckpt'" in str(r))
    if old:
        raise PcoccError(f"cannot checkpoint: {', '.join(old)} run(s) an older pcocc, which takes checkpoints its own way",
                         "Checkpoint the cluster with the pcocc version that started it, or restart it with this one.")
    return results


def _named(name, message):
    """message about VM name, prefixed with it unless it names it already ("vm3: no space left ...")."""
    return str(message) if str(message).startswith(f"{name}:") else f"{name}: {message}"


def _all_ok(results, what, hint="The cluster goes on as it was; nothing was written."):
    failed = [_named(n, r) for n, (ok, r) in results.items() if not ok]
    if failed:
        raise PcoccError(f"checkpoint failed ({what}): {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""), hint)
    return {n: r for n, (ok, r) in results.items()}
