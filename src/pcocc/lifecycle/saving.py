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


def save_disk(vm, agent, rev, images, dest=None, full=False, safe=False, freeze_timeout=FREEZE_TIMEOUT):
    """Save the image disk of a running VM; a dict describing the new revision."""
    if rev is None or not vm.config.disk:
        raise UsageError(f"{vm.config.name} has no image disk to save (its template has no image)")
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
        if backing is None:
            qemuimg.create(path, rev.size)
        else:
            qcow2.create_overlay(path, backing, rev.size)
        freeze_started = time.monotonic()
        freeze()
        try:
            snapshot.backup(vm.monitor, "disk0", path, "full" if backing is None else "top", on_started=thaw)
        finally:
            thaw()
        report["layer_bytes"] = os.path.getsize(path)

    freeze_started = None
    new = images.save_layer(rev, fill, dest=dest, full=full, description=None)
    report.update(uri=new.uri, repo=new.repo.name, image=new.name, revision=new.revision, base=rev.uri,
                  full=len(new.layers) == 1, seconds=round(time.monotonic() - started, 3))
    return report
