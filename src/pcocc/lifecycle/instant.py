"""Instant clusters: VMs restored from a memory snapshot of their booted template, not booted.

`pcocc template snapshot TPL` boots one VM of TPL, and checkpoints it (see
checkpoint.py) into ~/.pcocc/snapshots/TPL. Then `pcocc alloc|batch TPL:N`
restores each of the N VMs from it (a copy of the disk delta each, the same
memory image read by each qemu), and gives each its own identity through its
guest agent before it is declared running: fresh randomness from the host,
its hostname, new ssh host keys, a new machine id.

A snapshot is used only while it matches: the template's settings, the image
revision its name resolves to now, and the VM's cores and memory must be those
it was taken with; otherwise the VMs boot as usual (and the CLI says why).
"""

import os
import shutil

from pcocc.lifecycle import checkpoint
from pcocc.errors import NotFoundError, PcoccError

SNAPSHOTS = "snapshots"

# Run in the guest with its new name as $1 and host randomness (hex) as $2 (POSIX sh, busybox
# or not). Shell builtins where they do: a process costs tens of milliseconds under TCG.
IDENTITY_SCRIPT = r"""
name=$1
printf '%s' "$2" > /dev/urandom
# A write neither credits nor reseeds the kernel's generator, which every copy shares: add the host's
# bytes as credited entropy (RNDADDENTROPY: reseeds a generator not ready yet), then reseed (RNDRESEEDCRNG).
command -v perl > /dev/null && perl -e 'open(my $f, ">", "/dev/urandom") or exit 1; my $b = pack("H*", $ARGV[0]);
    ioctl($f, 0x40085203, pack("ii", 8 * length($b), length($b)) . $b); ioctl($f, 0x5207, 0)' "$2"
printf '%s\n' "$name" > /proc/sys/kernel/hostname && printf '%s\n' "$name" > /etc/hostname || exit 1
if [ -f /etc/hosts ]; then
    {
        while IFS= read -r line; do
            case "$line" in 127.0.1.1[[:space:]]*) ;; *) printf '%s\n' "$line" ;; esac
        done < /etc/hosts
        printf '127.0.1.1\t%s\n' "$name"
    } > /etc/hosts.pcocc && mv /etc/hosts.pcocc /etc/hosts
fi
for key in /etc/dropbear/dropbear_*_host_key; do
    [ ! -e "$key" ] || rm -f "$key"
done
for key in /etc/ssh/ssh_host_*_key; do
    [ -e "$key" ] || continue
    rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
    ssh-keygen -A > /dev/null && { [ ! -s /run/sshd.pid ] || kill -HUP "$(cat /run/sshd.pid)"; }
    break
done
if [ -s /etc/machine-id ]; then
    tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id
fi
# $3: the MACs of its NICs in NIC (PCI) order: each copy still has the snapshot's; then a new lease
[ -n "$3" ] || exit 0
set -- $3
for dev in $(for n in /sys/class/net/*; do [ -e "$n/device" ] && echo "$(readlink -f "$n/device") ${n##*/}"; done | sort | cut -d' ' -f2); do
    [ $# -gt 0 ] || break
    ip link set dev "$dev" address "$1" || exit 1
    shift
done
for cmdline in /proc/[0-9]*/cmdline; do  # DHCP clients read the MAC when they start: start them again
    args=$(tr '\0' ' ' < "$cmdline" 2> /dev/null) || continue
    set -- $args
    case "${1##*/} $2" in udhcpc* | dhclient* | "busybox udhcpc") ;; *) continue ;; esac
    pid=${cmdline#/proc/}
    kill "${pid%/cmdline}" || continue
    setsid $args < /dev/null > /dev/null 2>&1 &
done
command -v networkctl > /dev/null && networkctl renew $(ls /sys/class/net) > /dev/null 2>&1
exit 0
"""


def snapshot_dir(env, template):
    return os.path.join(env.user_conf_dir, SNAPSHOTS, template)


def refusals(config, settings):
    """Why VMs of a template with these settings cannot be snapshot ([] when they can)."""
    reasons = checkpoint.unmigratable(config, settings)
    if settings.get("persistent-drives"):
        reasons.append("it has persistent drives, which its VMs would share")
    if not settings.get("image"):
        reasons.append("it has no image")
    return reasons


def lookup(images, env, config, template, resolved, vcpus, memory_mb):
    """(restore entry {dir, vm}, None) for a snapshot that can be used; (None, why not) for one
    that cannot; (None, None) when there is none. vcpus None: each VM checks its own slice."""
    directory = snapshot_dir(env, template)
    if not os.path.exists(os.path.join(directory, checkpoint.MANIFEST)):
        return None, None
    try:
        manifest = checkpoint.load(directory)
        vm = manifest["vms"][0]
        if manifest.get("snapshot", {}).get("template") != template or len(manifest["vms"]) != 1:
            return None, "it is not a snapshot of this template"
        if checkpoint.settings_digest(resolved.values) != vm["settings_digest"]:
            return None, "the template changed since"
        reasons = refusals(config, resolved.values)
        if reasons:
            return None, reasons[0]
        try:
            rev = images.find(resolved.values["image"])
        except NotFoundError:
            return None, f"image {resolved.values['image']} is gone"
        if list(rev.layers) != list(vm["image"]["layers"]):
            return None, f"the image changed since (it is now {rev.uri}, the snapshot has {vm['image']['uri']})"
        if vcpus is not None and (vcpus, memory_mb) != (vm["vcpus"], vm["memory_mb"]):
            return None, f"it was taken with {vm['vcpus']} core(s) and {vm['memory_mb']} MiB, these VMs have {vcpus} and {memory_mb} MiB"
    except (PcoccError, KeyError, IndexError, TypeError) as exc:
        return None, f"it cannot be read ({getattr(exc, 'message', exc)})"
    return {"dir": directory, "vm": vm}, None


def delete(env, template):
    directory = snapshot_dir(env, template)
    if not os.path.exists(directory):
        raise NotFoundError(f"template '{template}' has no snapshot")
    shutil.rmtree(directory)


def give_identity(agent, name, macs=()):
    """Make a VM restored from a snapshot its own: randomness, hostname, ssh host keys, machine id,
    and its NICs' MACs (macs, in NIC order), with a new DHCP lease for them."""
    from pcocc.agent.qga import AgentError

    # every copy starts with the same random state: stir fresh host randomness in first
    code, out, err = agent.exec(["/bin/sh", "-c", IDENTITY_SCRIPT, "identity", name, os.urandom(256).hex(), " ".join(macs)],
                                timeout=120)
    if code != 0:
        raise AgentError(f"{name}: giving the restored VM its identity failed ({code}): {(err or out).decode(errors='replace').strip()[:200]}")
