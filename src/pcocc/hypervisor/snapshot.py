"""Disk backups and memory snapshots of a running qemu, through QMP.

Backups use `drive-backup`: its point in time is the moment the job is created
(a copy-before-write filter keeps that view while the guest goes on writing), so
the guest's file systems need to stay frozen only until the job exists, not
while the data is copied. `sync=top` copies only what the top layer (the VM's
overlay) holds: the target is an existing qcow2 file whose backing file is the
overlay's backing file. `sync=full` copies everything into a standalone file.

Memory goes out with `migrate` to an `exec:` URI that compresses into a file
(qemu 7.2 has no `file:` URI), and comes back with `-incoming exec:...`.
qemu reports the migration `completed` before it closes the pipe and reaps the
compressor (migration/migration.c sets the state, then a bottom half cleans up),
so `save_memory` then waits for the compressor to exit, tests the file
(`zstd -t`, `gzip -t`) and fsyncs it: a memory image it returns is whole and on disk.

Long waits take ``cancelled``, a callable polled while they wait (e.g. "the
client that asked left"): the job or migration is cancelled and SnapshotError
raised.  The VM's own disks are never touched by a backup: cancelling one leaves
them as they were.
"""

import os
import shlex
import shutil
import time

from pcocc.errors import NotFoundError, PcoccError, TimeoutExpired
from pcocc.fsutil import fsync_dir, fsync_file  # noqa: F401 - checkpoint and saving call them from here
from pcocc.runner import run

POLL = 0.05
MAX_BANDWIDTH = 1 << 40  # bytes/s: to a local file, as fast as qemu goes

COMPRESSOR_EXIT_TIMEOUT = 600  # seconds for the compressor to finish once qemu sent everything

# compressor name -> (command that compresses stdin into PATH, command that writes PATH decompressed to stdout,
#                     argv that tests PATH's integrity)
_COMPRESSORS = {
    "zstd": ("zstd -q -1 -T0 -f -o {path}", "zstd -q -d -c {path}", ["zstd", "-q", "-t"]),
    "gzip": ("gzip -1 > {path}", "gzip -d -c {path}", ["gzip", "-t"]),
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


def backup(monitor, device, target, sync, fmt="qcow2", job_id=None, on_started=None, timeout=None, cancelled=None):
    """Copy drive `device` into the existing file target; on_started() runs once the point in time is set.

    sync: "top" (what the top layer holds) or "full". Waits for the copy to end;
    SnapshotError when qemu reports one or once cancelled() is true, TimeoutExpired
    after timeout seconds (the job is cancelled in both cases). The target is not
    fsynced here: see fsync_file.
    """
    job_id = job_id or f"pcocc-backup-{device}"
    monitor.cmd("drive-backup", **{"job-id": job_id, "device": device, "target": target, "format": fmt,
                                   "sync": sync, "mode": "existing", "auto-dismiss": False})
    try:
        if on_started is not None:
            on_started()
        _wait_job(monitor, job_id, timeout, cancelled)
    except BaseException:
        _cancel_job(monitor, job_id)
        raise


def _wait_job(monitor, job_id, timeout, cancelled=None):
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
        if cancelled is not None and cancelled():
            raise SnapshotError(f"backup {job_id} abandoned: its client left")
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


def save_memory(monitor, path, name, timeout=None, cancelled=None, qemu_pid=None):
    """Write the VM's memory and device state to path (compressed with name); the VM ends up paused.

    Call it on a paused VM: then one pass copies everything, and the disks
    (inactivated by qemu once the migration completes) stay as they were.
    With qemu_pid, waits for qemu's compressor child to exit once the migration
    completed; then tests the file's integrity and fsyncs it. SnapshotError if
    the migration fails, is abandoned (cancelled(), the migration is cancelled and
    the VM stays paused) or the file is not whole; TimeoutExpired after timeout s.
    """
    monitor.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    monitor.cmd("migrate", uri="exec:" + _command(name, 0, path))
    try:
        st = wait_migration(monitor, timeout, "saving the memory", cancelled)
    except SnapshotError as exc:
        _cancel_migration(monitor)
        # qemu sees its compressor's pipe break ("Broken pipe"), not why: a full disk, said here
        full = None if cancelled is not None and cancelled() else _full(os.path.dirname(path))
        if full:
            raise SnapshotError(f"{exc.message} ({full})") from None
        raise
    except BaseException:
        _cancel_migration(monitor)
        raise
    if qemu_pid is not None:
        _wait_writer_exit(qemu_pid, path)
    test = run([*_COMPRESSORS[name][2], path], check=False)
    if test.returncode != 0:
        raise SnapshotError(f"the memory image {path} is not whole: {(test.stderr or '').strip() or f'{name} -t failed'}")
    fsync_file(path)
    return st


FULL_BELOW = 1 << 20  # bytes free (for this user) under which a directory's file system is taken as full


def _full(directory):
    """"no space left on the file system of DIRECTORY" when less than FULL_BELOW bytes are free
    there for this user (statvfs(3): f_bavail), else None."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < FULL_BELOW:
        return f"no space left on the file system of {directory}"
    return None


def _cancel_migration(monitor):
    try:
        if monitor.cmd("query-migrate").get("status") not in ("completed", "failed", "cancelled", None):
            monitor.cmd("migrate_cancel")
            for _ in range(200):
                if monitor.cmd("query-migrate").get("status") in ("failed", "cancelled", "completed"):
                    break
                time.sleep(POLL)
    except PcoccError:
        pass  # qemu gone: the first error is the one to report


def _wait_writer_exit(qemu_pid, path, timeout=COMPRESSOR_EXIT_TIMEOUT):
    """Wait until no child of qemu_pid has path on its command line (the exec: migration's compressor)."""
    deadline = time.monotonic() + timeout
    while _writers(qemu_pid, path):
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"the compressor writing {path} did not exit in {timeout} s")
        time.sleep(POLL)


def _writers(parent, path):
    """Pids of the children of parent (and their children) whose command line mentions path."""
    mention = os.fsencode(path)
    found, parents = [], {parent}
    for _ in range(2):  # qemu -> sh -c '...' -> gzip: two levels
        children = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
                if ppid in parents:
                    children.add(int(entry))
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if mention in f.read():
                            found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        parents = children
    return found


def wait_migration(monitor, timeout=None, what="restoring the memory", cancelled=None):
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
        if cancelled is not None and cancelled():
            raise SnapshotError(f"{what} abandoned: its client left")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
