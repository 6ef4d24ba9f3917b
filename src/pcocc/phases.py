"""The phases of a starting VM and a one-line summary of a cluster's start.

A VM process (lifecycle.vmrun) publishes one store update per phase, with the
wall-clock time it entered it (`since`, seconds since the epoch):

    pending     no record yet (its task or process has not started)
    starting    its overlay and cloud-init seed are made
    restoring   qemu loads a checkpoint or snapshot (instead of booting)
    qemu-start  qemu runs, the guest has printed nothing yet
    booting     the guest writes to its console (the kernel boots)
    running     its guest agent answered
    stopped, failed  the end (failed with its reason)

The scale work counts these updates: a handful per VM, never one per poll.
"""

import time

STARTING_PHASES = ("pending", "starting", "restoring", "qemu-start", "booting")
ENDED = ("stopped", "failed")
# qemu runs: what the original pcocc waited for before it gave the user the alloc shell or ran
# -E (its VMs needed no agent for that); the guest agent's answer ("running") comes after
QEMU_RUNS = ("restoring", "qemu-start", "booting", "running")


def started(vm, until="running"):
    """Whether a VM record has reached `until`: "running" (its guest agent answered, or none
    did within the bound: agent "none") or "qemu" (qemu runs: QEMU_RUNS)."""
    return vm.get("state") == "running" if until == "running" else vm.get("state") in QEMU_RUNS


def summary(vms, now=None):
    """One line on how far a starting cluster is, e.g.
    '2/4 VMs running; booting 1, qemu-start 1; slowest: vm3 qemu-start for 12 s'.

    vms: the VM records ([{name, state, since?}], as Backend.job gives them); now: the
    wall-clock time (default: time.time()). The slowest VM is the one in the earliest
    phase, and in it the longest (its `since`); none is named once all run.
    """
    now = time.time() if now is None else now
    running = sum(v.get("state") == "running" for v in vms)
    counts = {}
    for v in vms:
        if v.get("state") != "running":
            counts[v.get("state", "pending")] = counts.get(v.get("state", "pending"), 0) + 1
    order = {p: i for i, p in enumerate(STARTING_PHASES + ENDED)}
    text = f"{running}/{len(vms)} VMs running"
    if counts:
        text += "; " + ", ".join(f"{p} {n}" for p, n in sorted(counts.items(), key=lambda pn: order.get(pn[0], -1)))
    waiting = [v for v in vms if v.get("state", "pending") in STARTING_PHASES]
    if waiting and len(vms) > 1:
        slow = min(waiting, key=lambda v: (order[v.get("state", "pending")], v.get("since") or now))
        took = f" for {max(0.0, now - slow['since']):.0f} s" if slow.get("since") else ""
        text += f"; slowest: {slow['name']} {slow.get('state', 'pending')}{took}"
    return text
