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
    state = {"thawed": True}

    def freeze():
        try:
            count = agent.fsfreeze(timeout=SAFE_FREEZE_TIMEOUT if safe else freeze_timeout)
            report["frozen"] = True
            report["frozen_filesystems"] = count
        except AgentError as exc:
            if safe:
                raise PcoccError(f"{vm.config.name}: the guest agent could not freeze the file systems: {exc.message}") from None
            report["warnings"].append(f"could not freeze the file systems ({exc.message}): saved without freezing them")
        finally:
            state["thawed"] = False  # a freeze that timed out may still happen: thaw in any case

    def thaw():
        if state["thawed"]:
            return
        state["thawed"] = True
        try:
            agent.fsthaw(timeout=THAW_TIMEOUT)
            report["frozen_seconds"] = round(time.monotonic() - freeze_started, 3)
        except AgentError as exc:
            report["warnings"].append(f"could not thaw the file systems: {exc.message}")
            log.warning("%s: thaw failed: %s", vm.config.name, exc.message)

    def fill(path, backing):
        nonlocal freeze_started
        check_client()
        if backing is None:
            qemuimg.create(path, rev.size)
        else:
            qcow2.create_overlay(path, backing, rev.size)
        freeze_started = time.monotonic()
        freeze()
        try:
            snapshot.backup(vm.monitor, "disk0", path, "full" if backing is None else "top", on_started=thaw, cancelled=abandoned)
        except snapshot.SnapshotError:
            check_client()  # abandoned: say so, rather than how the copy was stopped
            raise
        finally:
            thaw()
        snapshot.fsync_file(path)
        report["layer_bytes"] = os.path.getsize(path)
        check_client()  # the last moment before the repository stores and publishes it

    freeze_started = None
    new = images.save_layer(rev, fill, dest=dest, full=full, description=None, before_commit=check_client)
    report.update(uri=new.uri, repo=new.repo.name, image=new.name, revision=new.revision, base=rev.uri,
                  full=len(new.layers) == 1, seconds=round(time.monotonic() - started, 3))
    return report
