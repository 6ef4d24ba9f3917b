"""Checkpoints of whole clusters (`pcocc ckpt`) and their restart (`alloc|batch -r DIR`).

A checkpoint directory holds, for each VM N:
    disk-vmN.qcow2        what its disk overlay held (a qcow2 delta on the image revision it ran on)
    drive-vmN-K.FORMAT    a whole copy of its persistent drive K
    memory-vmN.zst|.gz    its memory and device state (a qemu migration stream, compressed)
and ckpt.json, the manifest: definition, each VM's template, settings digest,
vCPUs, memory, image revision (with its layers), files and persistent drives.

Taking one (the CLI drives the VMs through their control endpoints):
    pause every VM  ->  each writes its disk delta, drive copies, then memory
    ->  every VM's qemu quits  ->  manifest written  ->  the directory published.
Any failure before the quit resumes the cluster as it was and publishes nothing.
Disks are copied before memory: once a migration completes qemu hands the disks
over (inactivates them), while a paused VM's disks do not change.

Restarting: the same definition, core counts and template settings are checked
first; each VM's disk starts as a copy of its delta on the same image revision,
its qemu starts with `-incoming`, and is continued once the memory is back.
Persistent drives are used in place, if they did not change since (else the
restart is refused: the checkpoint holds their copy).
"""

import datetime
import hashlib
import json
import os
import shutil
import uuid

from pcocc import __version__
from pcocc.errors import NotFoundError, PcoccError, UsageError
from pcocc.hypervisor import snapshot

MANIFEST = "ckpt.json"
FORMAT = 1
_EXT = {"zstd": "zst", "gzip": "gz"}


class CheckpointError(PcoccError):
    pass


# ---- what can be checkpointed ------------------------------------------------------------


def unmigratable(config, vm_settings):
    """Reasons a VM with these template settings cannot be checkpointed ([] when it can)."""
    from pcocc.networks import jobnet

    reasons = []
    mounts = vm_settings.get("mount-points") or {}
    if mounts:
        reasons.append(f"it has 9p mounts ({', '.join(sorted(mounts))}), which qemu cannot migrate")
    for name in jobnet.unmigratable_networks(config, vm_settings):
        reasons.append(f"network '{name}' ({config.networks[name].type}) passes a host device through")
    return reasons


def check_cluster(config, info):
    """CheckpointError naming every VM that cannot be checkpointed, and why."""
    problems = []
    for vm in info["vms"]:
        for reason in unmigratable(config, vm["settings"]):
            problems.append(f"vm{vm['rank']}: {reason}")
    if problems:
        raise CheckpointError(f"cannot checkpoint cluster {info['jobid']}: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                              "Checkpoints need VMs without 9p mount points or passthrough devices.")


# ---- the VM's side (runs in `pcocc internal run`) -------------------------------------------


def pause(vm):
    vm.monitor.cmd("stop")
    return {}


def resume(vm):
    """Let a paused VM run again (after a checkpoint that failed elsewhere)."""
    status = vm.monitor.cmd("query-status")["status"]
    if status != "running":
        vm.monitor.cmd("cont")  # after a completed migration, cont takes the disks back too
    return {}


def save_vm(vm, rev, drives, directory):
    """Write this (paused) VM's disk delta, persistent drive copies and memory into directory."""
    from pcocc.images import qcow2, qemuimg

    name = vm.config.name
    status = vm.monitor.cmd("query-status")["status"]
    if status not in ("paused", "postmigrate"):
        raise CheckpointError(f"{name}: not paused (state {status}): the checkpoint must pause every VM first")
    out = {"name": name, "vcpus": vm.config.topology.vcpus, "memory_mb": vm.config.topology.memory_mb, "drives": []}
    sizes = {b["device"]: b["inserted"]["image"]["virtual-size"] for b in vm.monitor.cmd("query-block") if b.get("inserted")}
    index = 0
    if vm.config.disk:
        out["disk"] = f"disk-{name}.qcow2"
        out["image"] = {"uri": rev.uri, "layers": list(rev.layers), "size": rev.size}
        target = os.path.join(directory, out["disk"])
        qcow2.create_overlay(target, os.path.abspath(rev.top), rev.size)
        snapshot.backup(vm.monitor, "disk0", target, "top", job_id="pcocc-ckpt-disk0")
        index = 1
    for k, (path, _cache, fmt) in enumerate(drives):
        copy = f"drive-{name}-{k}.{fmt}"
        size = sizes[f"disk{index + k}"]
        target = os.path.join(directory, copy)
        qemuimg.create(target, size, fmt)
        snapshot.backup(vm.monitor, f"disk{index + k}", target, "full", fmt=fmt, job_id=f"pcocc-ckpt-disk{index + k}")
        out["drives"].append({"path": path, "copy": copy, "format": fmt})
    comp = snapshot.compressor()
    out["memory"] = f"memory-{name}.{_EXT[comp]}"
    out["compress"] = comp
    snapshot.save_memory(vm.monitor, os.path.join(directory, out["memory"]), comp)
    out["memory_bytes"] = os.path.getsize(os.path.join(directory, out["memory"]))
    return out


def quit_vm(vm, drives):
    """Stop qemu without letting the guest run again; the state of the persistent drives after."""
    vm.stop(graceful=False)
    return {"drives": [_stamp(path) for path, _, _ in drives]}


def _stamp(path):
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---- manifest ---------------------------------------------------------------------------------


def settings_digest(settings):
    """What must not change between a checkpoint and its restart (the description may)."""
    data = {k: v for k, v in settings.items() if k not in ("description",)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def staging_dir(directory):
    """A new empty directory beside directory, where a checkpoint is written before it is published."""
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        raise NotFoundError(f"cannot write a checkpoint in {parent}: no such directory")
    path = os.path.join(parent, f".{os.path.basename(directory)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(path, 0o700)
    except OSError as exc:
        raise PcoccError(f"cannot write a checkpoint in {parent}: {exc.strerror}") from None
    return path


def write_manifest(staging, info, saved, stamps, extra=None):
    """ckpt.json in staging, from the cluster record and what each VM wrote."""
    vms = []
    for vm in info["vms"]:
        rank = vm["rank"]
        entry = {**saved[rank], "rank": rank, "template": vm["template"], "settings_digest": settings_digest(vm["settings"])}
        by_path = {s["path"]: s for s in stamps.get(rank, {}).get("drives", [])}
        for d in entry["drives"]:
            d.update({k: v for k, v in by_path.get(d["path"], {}).items() if k in ("size", "mtime_ns")})
        vms.append(entry)
    manifest = {
        "format": FORMAT, "pcocc": __version__, "jobid": info["jobid"], "name": info["name"], "definition": info["definition"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "vms": vms, **(extra or {}),
    }
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def publish(staging, directory, force):
    """Rename the finished checkpoint into place (replacing directory with force)."""
    old = None
    if os.path.lexists(directory):
        if not force:
            raise UsageError(f"{directory} exists already (-F replaces it)")
        old = f"{staging}.old"
        os.rename(directory, old)
    os.rename(staging, directory)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def load(directory):
    """The manifest of the checkpoint in directory (an absolute path)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise NotFoundError(f"{directory} is not a checkpoint (no {MANIFEST})", "Give a directory written by 'pcocc ckpt'.") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("vms"), list):
        raise CheckpointError(f"{path}: not a checkpoint manifest this pcocc understands")
    for vm in manifest["vms"]:
        for key in ("disk", "memory"):
            if vm.get(key) and not os.path.isfile(os.path.join(directory, vm[key])):
                raise CheckpointError(f"checkpoint {directory} is incomplete: {vm[key]} is missing")
    return manifest


def check_restart(manifest, directory, vms, resolved, cpus=None, memory_mb=None):
    """UsageError unless a cluster of vms (with resolved templates, and these per-VM
    cores and memory when known here) is the one the checkpoint was taken of."""
    was = [v["template"] for v in manifest["vms"]]
    now = [v.template for v in vms]
    if was != now:
        raise UsageError(f"checkpoint {directory} is of a cluster '{manifest['definition']}', not '{_fold(now)}'",
                         f"Restart it with the same definition: {manifest['definition']}.")
    for v in manifest["vms"]:
        name = f"vm{v['rank']}"
        if settings_digest(resolved[v["template"]].values) != v["settings_digest"]:
            raise UsageError(f"template '{v['template']}' changed since the checkpoint of {directory} was taken ({name} ran with other settings)")
        if cpus is not None and cpus != v["vcpus"]:
            raise UsageError(f"{name} had {v['vcpus']} core(s) when checkpointed, not {cpus}: restart with -c {v['vcpus']}")
        if memory_mb is not None and memory_mb != v["memory_mb"]:
            raise UsageError(f"{name} had {v['memory_mb']} MiB of memory when checkpointed, not {memory_mb}"
                             f" (use the same -c and -m as for the checkpointed cluster)")


def _fold(templates):
    parts = []
    for t in templates:
        if parts and parts[-1][0] == t:
            parts[-1][1] += 1
        else:
            parts.append([t, 1])
    return ",".join(f"{t}:{n}" for t, n in parts)


def restart_revision(images, vm):
    """The image revision a checkpointed VM ran on; an error if it is gone or changed."""
    image = vm.get("image")
    if not image:
        return None
    try:
        rev = images.find(image["uri"])
    except NotFoundError:
        raise CheckpointError(f"{vm['name']}: image {image['uri']}, which the checkpoint was taken on, is gone") from None
    if list(rev.layers) != list(image["layers"]):
        raise CheckpointError(f"{vm['name']}: image {image['uri']} changed since the checkpoint was taken")
    return rev


def check_vm(vm, vcpus, memory_mb):
    if vcpus != vm["vcpus"] or memory_mb != vm["memory_mb"]:
        raise CheckpointError(f"{vm['name']} was checkpointed with {vm['vcpus']} vCPU(s) and {vm['memory_mb']} MiB, "
                              f"its slice now has {vcpus} and {memory_mb} MiB: restart with the same resources")


def check_drives(vm, drives):
    """Persistent drives: the same paths, unchanged since the checkpoint."""
    now = [path for path, _, _ in drives]
    was = [d["path"] for d in vm.get("drives", [])]
    if now != was:
        raise CheckpointError(f"{vm['name']}: its persistent drives are not those of the checkpoint ({', '.join(was) or 'none'})")
    for d in vm.get("drives", []):
        st = os.stat(d["path"])
        if (st.st_size, st.st_mtime_ns) != (d.get("size"), d.get("mtime_ns")):
            raise CheckpointError(f"{vm['name']}: persistent drive {d['path']} changed since the checkpoint",
                                  f"The checkpoint holds its copy as {d['copy']}: copy it back to restart from it.")


def incoming_uri(directory, vm):
    return snapshot.incoming_uri(os.path.join(directory, vm["memory"]), vm["compress"])


def disk_path(directory, vm):
    return os.path.join(directory, vm["disk"]) if vm.get("disk") else None
