"""Disk backups and memory snapshots of a running qemu, through QMP.

Backups use `drive-backup`: its point in time is the moment the job is created
(a copy-before-write filter keeps that view while the guest goes on writing), so
the guest's file systems need to stay frozen only until the job exists, not
while the data is copied. `sync=top` copies only what the top layer (the VM's
overlay) holds: the target is an existing qcow2 file whose backing file is the
overlay's backing file. `sync=full` copies everything into a standalone file.

Memory goes out with `migrate` to an `exec:` URI that compresses into a file
(qemu 7.2 has no `file:` URI), and comes back with `-incoming exec:...`.
"""

import shlex
import shutil
import time

from pcocc.errors import NotFoundError, PcoccError, TimeoutExpired

POLL = 0.05
MAX_BANDWIDTH = 1 << 40  # bytes/s: to a local file, as fast as qemu goes

# compressor name -> (command that compresses stdin into PATH, command that writes PATH decompressed to stdout)
_COMPRESSORS = {
    "zstd": ("zstd -q -1 -T0 -f -o {path}", "zstd -q -d -c {path}"),
    "gzip": ("gzip -1 > {path}", "gzip -d -c {path}"),
}


class SnapshotError(PcoccError):
    pass


def compressor():
    """The best compressor this host has for memory images."""
    for name in ("zstd", "gzip"):
        if shutil.which(name):
            return name
    raise NotFoundError("neither zstd nor gzip is installed on this host: cannot write memory images")


def _command(name, which, path):
    if name not in _COMPRESSORS:
        raise SnapshotError(f"unknown memory image compression '{name}'")
    if not shutil.which(name):
        raise NotFoundError(f"{name} is not installed on this host: cannot read or write its memory images")
    return _COMPRESSORS[name][which].format(path=shlex.quote(path))


def incoming_uri(path, name):
    """The -incoming URI that restores the memory image at path."""
    return "exec:" + _command(name, 1, path)


def backup(monitor, device, target, sync, fmt="qcow2", job_id=None, on_started=None, timeout=None):
    """Copy drive `device` into the existing file target; on_started() runs once the point in time is set.

    sync: "top" (what the top layer holds) or "full". Waits for the copy to end;
    SnapshotError when qemu reports one, TimeoutExpired after timeout seconds
    (the job is cancelled).
    """
    job_id = job_id or f"pcocc-backup-{device}"
    monitor.cmd("drive-backup", **{"job-id": job_id, "device": device, "target": target, "format": fmt,
                                   "sync": sync, "mode": "existing", "auto-dismiss": False})
    try:
        if on_started is not None:
            on_started()
        _wait_job(monitor, job_id, timeout)
    except BaseException:
        _cancel_job(monitor, job_id)
        raise


def _wait_job(monitor, job_id, timeout):
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = POLL
    while True:
        jobs = {j["id"]: j for j in monitor.cmd("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            raise SnapshotError(f"qemu: the backup job {job_id} vanished")
        if job["status"] == "concluded":
            monitor.cmd("job-dismiss", id=job_id)
            if job.get("error"):
                raise SnapshotError(f"qemu: backup of {job_id}: {job['error']}")
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutExpired(f"qemu: backup {job_id} did not end in {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _cancel_job(monitor, job_id):
    try:
        jobs = {j["id"]: j for j in monitor.cmd("query-jobs")}
        if job_id not in jobs:
            return
        if jobs[job_id]["status"] != "concluded":
            monitor.cmd("job-cancel", id=job_id)
            for _ in range(200):
                jobs = {j["id"]: j for j in monitor.cmd("query-jobs")}
                if jobs.get(job_id, {}).get("status") in (None, "concluded"):
                    break
                time.sleep(POLL)
        monitor.cmd("job-dismiss", id=job_id)
    except PcoccError:
        pass  # qemu gone, or the job ended meanwhile: the first error is the one to report


def save_memory(monitor, path, name, timeout=None):
    """Write the VM's memory and device state to path (compressed with name); the VM ends up paused.

    Call it on a paused VM: then one pass copies everything, and the disks
    (inactivated by qemu once the migration completes) stay as they were.
    """
    monitor.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    monitor.cmd("migrate", uri="exec:" + _command(name, 0, path))
    return wait_migration(monitor, timeout, "saving the memory")


def wait_migration(monitor, timeout=None, what="restoring the memory"):
    """Wait for the migration (outgoing or incoming) to complete; its query-migrate answer."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = POLL
    while True:
        st = monitor.cmd("query-migrate")
        status = st.get("status")
        if status == "completed":
            return st
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"qemu: {what} failed: {st.get('error-desc', status)}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutExpired(f"qemu: {what} did not end in {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
