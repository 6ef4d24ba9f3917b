"""`pcocc save`, on the VM's side: its disk as a new image revision.

Runs in the process that runs the VM (it holds QMP and the guest agent):

1. freeze the guest's file systems through its agent (bounded wait; `safe`
   waits as long as it takes, and fails if the agent cannot freeze);
2. start a QMP backup of the VM's disk: `sync=top` into a new qcow2 layer whose
   backing file is the revision the VM runs on (by relative path, inside the
   repository), or `sync=full` into a standalone image;
3. thaw as soon as the backup job exists (its point in time is set then);
4. wait for the copy, store the layer under its hash and publish the revision.

A failure at any step publishes nothing: the layer is a tmp file until its
revision's metadata is linked in (see images/repo.py).

An abandoned save publishes nothing either: ``client_present`` (the control
endpoint's ``Session.present``) is polled while the copy runs (the backup job
is cancelled once the client left: Ctrl-C, killed, node lost) and checked again
once the layer is whole, and a last time once the repository has stored it,
just before its commit publishes it.  The VM's own disk chain is never changed
by a save (a backup job reads it), so it stays consistent whatever happens.
"""

import contextlib
import logging
import os
import time

from pcocc.agent.qga import AgentError
from pcocc.errors import PcoccError, UsageError
from pcocc.hypervisor import snapshot
from pcocc.images import qcow2, qemuimg

log = logging.getLogger("pcocc.save")

FREEZE_TIMEOUT = 20  # seconds, without --safe
SAFE_FREEZE_TIMEOUT = 10**7  # "as long as it takes"
THAW_TIMEOUT = 60


class SaveAbandoned(PcoccError):
    """The client of a save left before it was published: nothing was."""


def save_disk(vm, agent, rev, images, dest=None, full=False, safe=False, freeze_timeout=FREEZE_TIMEOUT, client_present=None):
    """Save the image disk of a running VM; a dict describing the new revision
    (uri, repo, image, revision, base, full, layer_bytes, seconds, frozen, warnings).

    client_present: a callable, true while the client that asked is still there;
    once false, the copy is cancelled and SaveAbandoned raised (nothing published).
    Raises UsageError (no image disk), PcoccError from the agent (safe) or the copy.
    """
    if rev is None or not vm.config.disk:
        raise UsageError(f"{vm.config.name} has no image disk to save (its template has no image)")

    def abandoned():
        return client_present is not None and not client_present()

    def check_client():
        if abandoned():
            raise SaveAbandoned(f"{vm.config.name}: save abandoned (its client left): nothing was published")

    started = time.monotonic()
    report = {"vm": vm.config.name, "frozen": False, "warnings": []}
    freezer = _Freezer(vm, agent, report, safe, freeze_timeout)

    def fill(path, backing):
        check_client()
        if backing is None:
            qemuimg.create(path, rev.size)
        else:
            qcow2.create_overlay(path, backing, rev.size)
        freezer.freeze()
        try:
            snapshot.backup(vm.monitor, "disk0", path, "full" if backing is None else "top", on_started=freezer.thaw, cancelled=abandoned)
        except snapshot.SnapshotError:
            check_client()  # abandoned: say so, rather than how the copy was stopped
            raise
        finally:
            freezer.thaw()
        snapshot.fsync_file(path)
        report["layer_bytes"] = os.path.getsize(path)
        check_client()  # the last moment before the repository stores and publishes it

    new = images.save_layer(rev, fill, dest=dest, full=full, description=None, before_commit=check_client)
    report.update(uri=new.uri, repo=new.repo.name, image=new.name, revision=new.revision, base=rev.uri,
                  full=len(new.layers) == 1, seconds=round(time.monotonic() - started, 3))
    return report


def save_drive(vm, agent, index, settings_drive, target=None, safe=False, freeze_timeout=FREEZE_TIMEOUT, client_present=None):
    """`pcocc save -i N`: a point-in-time copy of the VM's persistent drive N, while it runs.

    settings_drive: the template's entry of that drive ({path, format, backup, ...});
    target: where to write the copy (a path on this host), default the drive's `backup`
    setting. The guest's file systems are frozen while the copy starts (as for a disk
    save); qemu copies the whole drive (drive-backup, sync=full) into a new file beside
    the target, which replaces the target only once whole and on disk (a failed or
    abandoned copy leaves the previous backup as it was). Returns {vm, drive, path,
    target, bytes, seconds, frozen, warnings}. Raises UsageError (no such drive, no
    target), PcoccError (the copy), SaveAbandoned (the client left).
    """
    import tempfile

    drives = vm.config.drives
    if not 0 <= index < len(drives):
        raise UsageError(f"{vm.config.name} has no persistent drive {index} (it has {len(drives)}: -i 0 to {len(drives) - 1})"
                         if drives else f"{vm.config.name} has no persistent drive")
    path, _, fmt = drives[index]
    target = target or settings_drive.get("backup")
    if not target:
        raise UsageError(f"persistent drive {index} of {vm.config.name} ({path}) has no 'backup' in its template",
                         "Give the copy's path with -d PATH, or set 'backup: PATH' on the drive.")
    target = os.path.abspath(os.path.expanduser(target))
    if os.path.realpath(target) == os.path.realpath(path):
        raise UsageError(f"the backup of {path} cannot be the drive itself")
    _check_private_dir(os.path.dirname(target))
    device = f"disk{index + (1 if vm.config.disk else 0)}"
    size = _virtual_size(vm.monitor, device)
    started = time.monotonic()
    report = {"vm": vm.config.name, "drive": index, "path": path, "target": target, "frozen": False, "warnings": []}
    freezer = _Freezer(vm, agent, report, safe, freeze_timeout)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".pcocc-tmp", dir=os.path.dirname(target))
    os.close(fd)
    try:
        qemuimg.create(tmp, size, fmt)
        freezer.freeze()
        try:
            snapshot.backup(vm.monitor, device, tmp, "full", fmt=fmt, job_id=f"pcocc-drive-{index}", on_started=freezer.thaw,
                            cancelled=lambda: client_present is not None and not client_present())
        finally:
            freezer.thaw()
        if client_present is not None and not client_present():
            raise SaveAbandoned(f"{vm.config.name}: backup of drive {index} abandoned (its client left): {target} is unchanged")
        snapshot.fsync_file(tmp)
        os.replace(tmp, target)
        tmp = None
        from pcocc.fsutil import fsync_dir

        fsync_dir(os.path.dirname(target))
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    report.update(bytes=os.path.getsize(target), seconds=round(time.monotonic() - started, 3))
    return report


def _check_private_dir(directory):
    """UsageError unless `directory` exists, is ours and no one else may write in it: qemu opens
    the copy's file by its path, and another user who could rename files there could swap it for
    a link to any file of ours between its creation and its use."""
    import stat

    try:
        st = os.stat(directory)
    except OSError as exc:
        raise UsageError(f"cannot write a drive copy in {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UsageError(f"drive copies are written only in a directory of yours that no one else may write: {directory}")


def _virtual_size(monitor, device):
    """Bytes of drive `device`, as qemu sees it (QMP query-block)."""
    for block in monitor.cmd("query-block"):
        if block.get("device") == device and block.get("inserted"):
            return block["inserted"]["image"]["virtual-size"]
    raise PcoccError(f"qemu has no drive {device}")


class _Freezer:
    """Freeze the guest's file systems through its agent, then thaw them (once)."""

    def __init__(self, vm, agent, report, safe, timeout):
        self.vm, self.agent, self.report, self.safe, self.timeout = vm, agent, report, safe, timeout
        self.thawed, self.since = True, None

    def freeze(self):
        self.since = time.monotonic()
        try:
            self.report["frozen_filesystems"] = self.agent.fsfreeze(timeout=SAFE_FREEZE_TIMEOUT if self.safe else self.timeout)
            self.report["frozen"] = True
        except AgentError as exc:
            if self.safe:
                raise PcoccError(f"{self.vm.config.name}: the guest agent could not freeze the file systems: {exc.message}") from None
            self.report["warnings"].append(f"could not freeze the file systems ({exc.message}): saved without freezing them")
        finally:
            self.thawed = False  # a freeze that timed out may still happen: thaw in any case

    def thaw(self):
        if self.thawed:
            return
        self.thawed = True
        try:
            self.agent.fsthaw(timeout=THAW_TIMEOUT)
            self.report["frozen_seconds"] = round(time.monotonic() - self.since, 3)
        except AgentError as exc:
            self.report["warnings"].append(f"could not thaw the file systems: {exc.message}")
            log.warning("%s: thaw failed: %s", self.vm.config.name, exc.message)


