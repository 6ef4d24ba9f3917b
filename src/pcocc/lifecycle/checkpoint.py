"""Checkpoints of whole clusters (`pcocc ckpt`) and their restart (`alloc|batch -r DIR`).

A checkpoint directory holds, for each VM N:
    disk-vmN.qcow2        what its disk overlay held (a qcow2 delta on the image revision it ran on)
    drive-vmN-K.FORMAT    a whole copy of its persistent drive K
    memory-vmN.zst|.gz    its memory and device state (a qemu migration stream, compressed)
and ckpt.json, the manifest: definition, each VM's template, settings digest,
vCPUs, memory, image revision (with its layers), files and persistent drives.

Taking one (the CLI drives the VMs through one stream each, the op ckpt of their
control endpoints, reached through the host relays: lifecycle.control.op_ckpt):
    pause every VM  ->  each writes its disk delta, drive copies, then memory
    into a staging directory beside DIR, and fsyncs each file
    ->  the manifest is written last and fsynced, then the staging directory
    ->  published: renamed to DIR (or atomically exchanged with the old
        checkpoint at DIR, with -F), the parent directory fsynced
    ->  only then every VM's qemu quits.
Nothing stops a VM before its checkpoint is complete and durable: any failure
before the quit (a VM's write, ENOSPC on the manifest, the rename) resumes the
cluster as it was and removes the staging directory.  A VM also resumes by itself
when its stream ends before the quit (the CLI killed, a relay or node lost).  Disks are copied before memory: once a migration
completes qemu hands the disks over (inactivates them), while a paused VM's
disks do not change.

-F replaces only a pcocc checkpoint: a directory whose ckpt.json this pcocc
reads, holding no file its manifest does not name (see check_replaceable).  The
old checkpoint's files are removed by name after the exchange, never by rmtree.

Restarting: the same definition, core counts and template settings are checked
first; each VM's disk starts as a copy of its delta on the same image revision,
its qemu starts with `-incoming`, and is continued once the memory is back.
Persistent drives are used in place, if they did not change since (else the
restart is refused: the checkpoint holds their copy).
"""

import ctypes
import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import uuid

from pcocc import __version__
from pcocc.cluster import settings_runs
from pcocc.errors import NotFoundError, PcoccError, UsageError
from pcocc.hypervisor import snapshot

MANIFEST = "ckpt.json"
FORMAT = 1
_EXT = {"zstd": "zst", "gzip": "gz"}

log = logging.getLogger(__name__)


class CheckpointError(PcoccError):
    pass


# ---- what can be checkpointed ------------------------------------------------------------


def unmigratable(config, vm_settings):
    """Reasons a VM with these template settings cannot be checkpointed ([] when it can)."""
    from pcocc.networks import jobnet

    reasons = []
    mounts = vm_settings.get("mount-points") or {}
    by_type = {}
    for tag, m in mounts.items():
        by_type.setdefault("virtio-fs" if isinstance(m, dict) and m.get("type") == "virtio-fs" else "9p", []).append(tag)
    for kind, tags in sorted(by_type.items()):
        reasons.append(f"it has {kind} mounts ({', '.join(sorted(tags))}), which qemu cannot migrate")
    for name in jobnet.unmigratable_networks(config, vm_settings):
        reasons.append(f"network '{name}' ({config.networks[name].type}) passes a host device through")
    return reasons


def check_cluster(config, info):
    """CheckpointError naming every VM that cannot be checkpointed, and why."""
    problems = []
    for _, settings, first, count in settings_runs(info):  # each template once, not each VM
        why = unmigratable(config, settings)
        for rank in range(first, first + count) if why else ():
            problems += [f"vm{rank}: {reason}" for reason in why]
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


def save_vm(vm, rev, drives, directory, cancelled=None):
    """Write this (paused) VM's disk delta, persistent drive copies and memory into directory.

    Each file is fsynced before this returns; the entry of the manifest for this VM
    (dict), with the size and mtime (ns) of each persistent drive as the checkpoint
    leaves it. cancelled: a callable polled during the copies (the client left):
    SnapshotError then, and the VM stays paused (the caller resumes it).
    """
    from pcocc.images import qcow2, qemuimg

    name = vm.config.name
    status = vm.monitor.cmd("query-status")["status"]
    if status not in ("paused", "postmigrate"):
        raise CheckpointError(f"{name}: not paused (state {status}): the checkpoint must pause every VM first")
    topo = vm.config.topology
    # cores: the task's slice, the emulator cores (template emulator-cores) included: what a restart asks for
    out = {"name": name, "vcpus": topo.vcpus, "cores": topo.vcpus + len(topo.emulator_cores), "memory_mb": topo.memory_mb,
           "drives": []}
    sizes = {b["device"]: b["inserted"]["image"]["virtual-size"] for b in vm.monitor.cmd("query-block") if b.get("inserted")}
    index = 0
    if vm.config.disk:
        out["disk"] = f"disk-{name}.qcow2"
        out["image"] = {"uri": rev.uri, "layers": list(rev.layers), "size": rev.size}
        target = os.path.join(directory, out["disk"])
        qcow2.create_overlay(target, os.path.abspath(rev.top), rev.size)
        snapshot.backup(vm.monitor, "disk0", target, "top", job_id="pcocc-ckpt-disk0", cancelled=cancelled)
        snapshot.fsync_file(target)
        index = 1
    for k, (path, _cache, fmt) in enumerate(drives):
        copy = f"drive-{name}-{k}.{fmt}"
        size = sizes[f"disk{index + k}"]
        target = os.path.join(directory, copy)
        qemuimg.create(target, size, fmt)
        snapshot.backup(vm.monitor, f"disk{index + k}", target, "full", fmt=fmt, job_id=f"pcocc-ckpt-disk{index + k}",
                        cancelled=cancelled)
        snapshot.fsync_file(target)
        out["drives"].append({"path": path, "copy": copy, "format": fmt})
    comp = snapshot.compressor()
    out["memory"] = f"memory-{name}.{_EXT[comp]}"
    out["compress"] = comp
    qemu_pid = vm.proc.pid if getattr(vm, "proc", None) is not None else None
    snapshot.save_memory(vm.monitor, os.path.join(directory, out["memory"]), comp, cancelled=cancelled, qemu_pid=qemu_pid)
    out["memory_bytes"] = os.path.getsize(os.path.join(directory, out["memory"]))
    # the drives as the checkpoint leaves them: qemu flushed and inactivated them when the migration completed
    by_path = {s["path"]: s for s in (_stamp(path) for path, _, _ in drives)}
    for d in out["drives"]:
        d.update(size=by_path[d["path"]]["size"], mtime_ns=by_path[d["path"]]["mtime_ns"])
    return out


def quit_vm(vm, drives):
    """Stop qemu without letting the guest run again; the state of the persistent drives after
    ({"drives": [{path, size, mtime_ns}]}), to check against what save_vm saw."""
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


def write_manifest(staging, info, saved, stamps=None, extra=None):
    """ckpt.json in staging, from the cluster record and what each VM wrote ({rank: entry});
    stamps ({rank: {"drives": [...]}}) override the drives' size and mtime_ns.

    Written to a temporary name, fsynced, renamed, then the directory fsynced: the
    manifest names only files that are already durable, and is itself whole or
    absent. CheckpointError (one line) on any OS error, e.g. ENOSPC.
    """
    vms = []
    ranks = [(rank, template, digest) for template, settings, first, count in settings_runs(info)
             for digest in [settings_digest(settings)] for rank in range(first, first + count)]  # each template once
    for rank, template, digest in ranks:
        entry = {**saved[rank], "rank": rank, "template": template, "settings_digest": digest}
        entry["drives"] = [dict(d) for d in entry.get("drives", [])]
        by_path = {s["path"]: s for s in (stamps or {}).get(rank, {}).get("drives", [])}
        for d in entry["drives"]:
            d.update({k: v for k, v in by_path.get(d["path"], {}).items() if k in ("size", "mtime_ns")})
        vms.append(entry)
    manifest = {
        "format": FORMAT, "pcocc": __version__, "jobid": info["jobid"], "name": info["name"], "definition": info["definition"],
        "uuid": info.get("uuid"),  # a restart is the same cluster, the same cloud-init instance
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "vms": vms, **(extra or {}),
    }
    path = os.path.join(staging, MANIFEST)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        snapshot.fsync_dir(staging)
    except OSError as exc:
        with _suppress_os():
            os.unlink(tmp)
        raise CheckpointError(f"cannot write the checkpoint's manifest in {staging}: {exc.strerror or exc}") from None
    return manifest


def check_replaceable(directory):
    """UsageError unless directory (absolute) can be replaced by a new checkpoint (-F):
    it must be a real directory (not a symlink) holding a pcocc checkpoint, i.e. a
    manifest this pcocc reads, and no file that manifest does not name. Returns the
    names of its files."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return set()
    hint = "-F replaces only a checkpoint written by 'pcocc ckpt': choose another DIR, or move it away."
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{directory} is not a pcocc checkpoint (not a directory): -F will not replace it", hint)
    try:
        manifest = _read_manifest(directory)
        names = _files_of(manifest)
    except NotFoundError:
        raise UsageError(f"{directory} is not a pcocc checkpoint (no {MANIFEST}): -F will not replace it", hint) from None
    except PcoccError as exc:
        raise UsageError(f"{directory} is not a pcocc checkpoint ({exc.message}): -F will not replace it", hint) from None
    try:
        present = set(os.listdir(directory))
    except OSError as exc:
        raise UsageError(f"cannot read {directory}: {exc.strerror}") from None
    others = sorted(present - names)
    if others:
        raise UsageError(f"{directory} holds files that are not part of its checkpoint ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}): -F will not replace it", hint)
    return present


def _files_of(manifest):
    names = {MANIFEST}
    for vm in manifest["vms"]:
        for key in ("disk", "memory"):
            if vm.get(key):
                names.add(vm[key])
        for d in vm.get("drives", []):
            if d.get("copy"):
                names.add(d["copy"])
    if any("/" in n or n in (".", "..") for n in names):
        raise CheckpointError("its manifest names files outside of its directory")
    return names


def publish(staging, directory, force):
    """Put the finished (fsynced) checkpoint in staging at directory, durably.

    Without force, directory must not exist (renameat2 RENAME_NOREPLACE: an empty
    directory created meanwhile is not silently replaced). With force, an existing
    directory must be a checkpoint (check_replaceable): the two are exchanged
    atomically (RENAME_EXCHANGE), so directory always holds one whole checkpoint,
    then the old one's files are removed by name. The parent is fsynced.
    Raises UsageError or CheckpointError; staging is left for the caller to remove.
    """
    parent = os.path.dirname(directory)
    exists = os.path.lexists(directory)
    if exists and not force:
        raise UsageError(f"{directory} exists already (-F replaces it)")
    old_files = check_replaceable(directory) if exists else None
    old = staging  # where the replaced checkpoint ends up
    try:
        snapshot.fsync_dir(staging)
        if exists:
            try:
                _rename(staging, directory, _RENAME_EXCHANGE)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                # a file system without the exchange (e.g. NFS): the old one aside, then the new one in
                old = f"{staging}.old"
                os.rename(directory, old)
                try:
                    os.rename(staging, directory)
                except OSError:
                    os.rename(old, directory)
                    raise
        else:
            try:
                _rename(staging, directory, _RENAME_NOREPLACE)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                if os.path.lexists(directory):
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
                os.rename(staging, directory)
        snapshot.fsync_dir(parent)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise UsageError(f"{directory} appeared while the checkpoint was written (-F replaces it)") from None
        raise CheckpointError(f"cannot publish the checkpoint as {directory}: {exc.strerror or exc}") from None
    if exists:  # old holds the replaced checkpoint: remove what its manifest named, nothing else
        for name in old_files:
            with _suppress_os():
                os.unlink(os.path.join(old, name))
        try:
            os.rmdir(old)
        except OSError as exc:
            log.warning("the replaced checkpoint is left in %s: %s", old, exc.strerror)


def discard_staging(staging):
    """Remove a staging directory that was never published (only pcocc wrote in it)."""
    if staging and os.path.isdir(staging) and not os.path.islink(staging):
        shutil.rmtree(staging, ignore_errors=True)


class _suppress_os:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def _rename(src, dst, flags):
    """renameat2(2) with flags; OSError as the kernel reports it (source: rename(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    else:  # glibc < 2.28: the system call itself
        nr = _SYS_RENAMEAT2.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available")
        rc = libc.syscall(nr, _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst)


def load(directory):
    """The manifest of the checkpoint in directory (an absolute path); NotFoundError
    without a manifest, CheckpointError if unreadable or a file it names is missing."""
    manifest = _read_manifest(directory)
    for vm in manifest["vms"]:
        for key in ("disk", "memory"):
            if vm.get(key) and not os.path.isfile(os.path.join(directory, vm[key])):
                raise CheckpointError(f"checkpoint {directory} is incomplete: {vm[key]} is missing")
    return manifest


def restart_record(directory, manifest):
    """What a restarting cluster's record keeps of its checkpoint: {dir, manifest_sha256}. The
    manifest itself (about 420 bytes per VM: 6.7 MB at 16,000 VMs, over etcd's 1.5 MiB request
    limit) stays in DIR, which every node reads anyway (its disks and memory are there); its
    digest makes sure each VM restores the checkpoint that was checked at submission."""
    return {"dir": directory, "manifest_sha256": manifest_digest(manifest)}


def manifest_digest(manifest):
    """The sha256 (hex) of a manifest's canonical JSON (sorted keys, no spaces)."""
    import hashlib

    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def restart_vm(restart, rank):
    """{dir, vm}: the manifest entry of VM `rank` of a restart record (restart_record, or an
    older pcocc's record that holds the manifest itself). Raises CheckpointError when DIR's
    manifest is not the one checked at submission (replaced since: pcocc ckpt -F)."""
    manifest = restart.get("manifest")
    if manifest is None:
        manifest = load(restart["dir"])
        if manifest_digest(manifest) != restart.get("manifest_sha256"):
            raise CheckpointError(f"checkpoint {restart['dir']} changed since this restart was submitted: not restored")
    if not 0 <= rank < len(manifest["vms"]):
        raise CheckpointError(f"checkpoint {restart['dir']} has no VM of rank {rank}")
    return {"dir": restart["dir"], "vm": manifest["vms"][rank]}


def _read_manifest(directory):
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise NotFoundError(f"{directory} is not a checkpoint (no {MANIFEST})", "Give a directory written by 'pcocc ckpt'.") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("vms"), list)
            or not all(isinstance(vm, dict) for vm in manifest["vms"])):
        raise CheckpointError(f"{path}: not a checkpoint manifest this pcocc understands")
    problem = _manifest_problem(manifest)
    if problem:  # a manifest edited by hand, or cut: one line, never a traceback later on
        raise CheckpointError(f"{path}: {problem}")
    return manifest


def _manifest_problem(manifest):
    """What is wrong in the shape of a manifest that a restart reads, or None: a definition, each
    VM's rank, template, vcpus and memory_mb, and the cluster's --image/--mount overrides."""
    if not isinstance(manifest.get("definition"), str) or not manifest["definition"]:
        return "its 'definition' is missing or not text"
    for i, vm in enumerate(manifest["vms"]):
        for key, kind in (("rank", int), ("template", str), ("settings_digest", str), ("vcpus", int), ("memory_mb", int),
                          ("cores", int)):
            if key in ("vcpus", "memory_mb", "cores") and key not in vm:
                continue  # older manifests: the restart's resources are then given by the user (or cores = vcpus)
            if not isinstance(vm.get(key), kind) or isinstance(vm.get(key), bool):
                return f"VM {i}: its '{key}' is missing or not {'a number' if kind is int else 'text'}"
    overrides = manifest.get("overrides")
    if overrides is not None and (not isinstance(overrides, dict)
                                  or not isinstance(overrides.get("images") or {}, dict)
                                  or not isinstance(overrides.get("mounts") or {}, dict)):
        return "its 'overrides' (--image and --mount) are not {images: {...}, mounts: {...}}"
    return None


def slice_cores(vm):
    """The cores of a checkpointed VM's slice (its manifest entry): its vCPUs and its emulator
    cores (template emulator-cores), which -c asks for. Manifests written before it was
    recorded have only "vcpus" (right unless the template kept emulator cores)."""
    return vm.get("cores", vm.get("vcpus"))


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
        if cpus is not None and cpus != slice_cores(v):
            raise UsageError(f"{name} had {slice_cores(v)} core(s) when checkpointed, not {cpus}: restart with -c {slice_cores(v)}")
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
