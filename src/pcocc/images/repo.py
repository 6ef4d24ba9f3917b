"""Image repositories: content-addressed immutable layers plus one metadata file per revision.

Layout of a repository directory:
    .pcocc-repo             {"version": 1}
    .lock-write             flock: shared while a write is in flight, exclusive for gc
    .lock-meta              flock: exclusive to publish or delete a revision
    blobs/<sha256>          qcow2 layers, read-only; a layer's backing file is "../blobs/<sha256>",
                            so the repository can be moved or mounted elsewhere
    meta/<name>/<rev>.json  one revision: layers bottom to top, owner, timestamp, size, boot files
    meta/<name>/.high-water the metadata of the highest revision deleted so far (absent until then):
                            revision numbers are never reused, so IMAGE@N names one content for ever
    tmp/                    work files; renamed into blobs/ and meta/ when complete

A revision becomes visible only by an atomic link of its complete, fsynced
metadata file, so a writer killed at any moment leaves nothing partial behind
(only tmp files and unreferenced blobs, which `repo gc` removes). A write that
fails (no space, no inode, permission) raises a one-line RepositoryError and
removes what it added, so that `image verify` finds no problem and `repo gc`
nothing to remove afterwards.

Permissions: a repository of the user's scope is created owner-only (0700,
with the directories pcocc creates above it); a system repository is created
with the process's umask and keeps whatever mode the admin gives it. Blobs and
metadata files are read-only, readable by whom the repository's root lets read
(0400 under a 0700 root, 0444 under 0755).

The original pcocc's layout (`.config`, `data/`, `meta/<name>@<rev>`) is read
and written in place by images/upstream.py, with the original's rules: the
never-reused revision rule applies to this layout only.
"""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field

from pcocc.errors import CommandError, NotFoundError, PcoccError, PermissionDenied, ResourceError, UsageError
from pcocc.fsutil import fsync_dir
from pcocc.images import qcow2

FORMAT_VERSION = 1
HIGH_WATER = ".high-water"
log = logging.getLogger(__name__)


class ImageExists(UsageError):
    """The destination image exists already (a usage error: choose another name)."""


class RepositoryError(PcoccError):
    """A repository could not be read or written (an I/O error, named with its repository)."""


class RepositoryFull(ResourceError):
    """No space or no inode left where a repository lives (exit status RESOURCES)."""


class RepositoryDenied(PermissionDenied):
    """The file system refused a repository write (permissions, read-only mount)."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Revision:
    repo: "Repository"
    name: str
    revision: int
    layers: tuple  # blob hashes, bottom to top
    size: int  # virtual size in bytes
    owner: str = ""
    timestamp: str = ""
    description: str = ""
    boot: dict = field(default_factory=dict)  # optional kernel/initrd blobs and append line

    @property
    def uri(self):
        return f"{self.repo.name}:{self.name}@{self.revision}"

    @property
    def top(self):
        return self.repo.blob_path(self.layers[-1])

    def boot_files(self):
        """(kernel path, initrd path or None, append) when the image carries its kernel, else None.

        Raises RepositoryError (one line) when the metadata names a kernel or
        initrd whose blob is missing: such a VM would not boot.
        """
        if not self.boot.get("kernel"):
            return None
        initrd = self.boot.get("initrd")
        files = self.repo.blob_path(self.boot["kernel"]), self.repo.blob_path(initrd) if initrd else None
        for what, path in zip(("kernel", "initrd"), files):
            if path and not os.path.isfile(path):
                raise RepositoryError(f"{self.uri}: its {what} ({os.path.basename(path)[:12]}) is missing from the repository",
                                      "Run 'pcocc image verify', then rebuild or re-import the image.")
        return files[0], files[1], self.boot.get("append", "")

    def boot_problem(self):
        """Why a VM of this revision cannot boot without a template 'kernel', or None if it can (or if unknown).

        An image boots its own kernel (boot files in its metadata, all present)
        or its disk's BIOS boot sector. Without either, qemu would wait for ever
        on "No bootable device": the VM must fail with this line instead.
        """
        try:
            if self.boot_files():
                return None
        except RepositoryError as exc:
            return exc.message
        try:
            code = qcow2.has_boot_code(self.top)
        except (OSError, ValueError):
            return None  # the disk itself is checked when qemu opens it
        if code is False:
            return (f"{self.uri} cannot boot: it has no boot files (kernel, initrd) and its disk no boot sector "
                    "(was it imported without the files 'image export' writes beside the disk?)")
        return None

    def disk_usage(self):
        return sum(os.path.getsize(self.repo.blob_path(s)) for s in self.layers if os.path.exists(self.repo.blob_path(s)))

    def to_json(self):
        return {
            "repo": self.repo.name, "name": self.name, "revision": self.revision, "uri": self.uri,
            "layers": list(self.layers), "size": self.size, "owner": self.owner,
            "timestamp": self.timestamp, "description": self.description, "boot": self.boot,
        }


class Repository:
    """A repository in pcocc's own layout (see the module's docstring)."""

    layout = "pcocc"

    def __init__(self, name, path, scope="user"):
        self.name = name
        self.path = path
        self.scope = scope

    @property
    def private(self):
        """True for a user's repository: created owner-only (0700)."""
        return self.scope == "user"

    # -- errors
    def error(self, what, exc):
        """The one-line PcoccError for an OSError (or a qemu-img failure) met while doing what."""
        if isinstance(exc, CommandError):
            if any(t in exc.stderr for t in _NO_SPACE_TEXT):
                return RepositoryFull(f"repository '{self.name}' ({self.path}): no space left while {what}",
                                      "Free some space there (delete images, then 'pcocc image repo gc').")
            return exc
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno in _NO_SPACE:
            return RepositoryFull(f"repository '{self.name}' ({self.path}): {reason} while {what}",
                                  "Free some space or inodes there (delete images, then 'pcocc image repo gc').")
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in _DENIED:
            return RepositoryDenied(f"repository '{self.name}' ({self.path}): {reason}{where} while {what}")
        return RepositoryError(f"repository '{self.name}' ({self.path}): {reason}{where} while {what}")

    @contextlib.contextmanager
    def io(self, what):
        """Turn OSError (and qemu-img's out-of-space failures) into one-line repository errors."""
        try:
            yield
        except (OSError, CommandError) as exc:
            err = self.error(what, exc)
            if err is exc:
                raise
            raise err from None

    def file_mode(self):
        """Mode of blobs and metadata files: read-only, readable by whom the root lets read (0400 under 0700)."""
        try:
            root = stat.S_IMODE(os.stat(self.path).st_mode)
        except OSError:
            root = 0o700 if self.private else 0o755
        return 0o400 | (root & 0o044)

    def _mkdir(self, path):
        """Create path and its missing parents: 0700 for a private repository, else per the umask."""
        mode = 0o700 if self.private else 0o777
        missing = []
        while path and not os.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, mode)

    # -- layout
    def _p(self, *parts):
        return os.path.join(self.path, *parts)

    def blob_path(self, sha):
        return self._p("blobs", sha)

    def layer_backing(self, sha):
        """The backing file name of a layer on blob sha: relative, valid from blobs/ and from tmp/."""
        return f"../blobs/{sha}"

    def exists(self):
        return os.path.isfile(self._p(".pcocc-repo"))

    def writable(self):
        return os.access(self.path if os.path.isdir(self.path) else os.path.dirname(self.path) or ".", os.W_OK)

    def ensure(self):
        """Create the repository layout if needed (for writing).

        A user's repository (and any directory pcocc creates above it, such as
        ~/.pcocc) is created 0700: its disks may hold secrets. Raises
        RepositoryDenied, RepositoryFull or RepositoryError (one line).
        """
        if self.exists():
            return
        tmp = self._p(f".pcocc-repo.{os.getpid()}.{uuid.uuid4().hex[:8]}")  # several processes may create it at once
        try:
            with self.io("creating the repository"):
                self._mkdir(self.path)
                for d in ("blobs", "meta", "tmp"):
                    self._mkdir(self._p(d))
                self._write_file(tmp, json.dumps({"version": FORMAT_VERSION}).encode())
                os.replace(tmp, self._p(".pcocc-repo"))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _write_file(self, path, data):
        """Write a new file durably (O_EXCL, fsync) with the repository's file mode."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.file_mode())
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _flock(self, which, exclusive):
        fd = self._lock_fd(which)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _lock_fd(self, which):
        self.ensure()
        path = self._p(f".lock-{which}")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, self.file_mode() | 0o200)
        except OSError as exc:
            if exc.errno not in _DENIED + _NO_SPACE:
                raise self.error(f"opening {path}", exc) from None
            try:  # a repository we may only read (or that is full): flock works on a read-only fd too
                return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                if exc.errno in _NO_SPACE:
                    raise self.error(f"creating its lock file {path}", exc) from None
                raise PermissionDenied(f"repository '{self.name}' ({self.path}) is read-only for you") from None

    @contextlib.contextmanager
    def transaction(self, what):
        """A write: holds writing() and turns I/O errors into one-line errors (see io()).

        Yields a list to which store_blob() adds the blobs this write created. If
        the body raises (anything, Ctrl-C included), those of them that no
        revision uses are removed once no other write is in flight (else they
        are left to `repo gc`), so that a failed import, save or copy leaves the
        repository as it was.
        """
        added = []
        try:
            with self.io(what), self.writing():
                yield added
        except BaseException:
            if added:
                self._discard(added)
            raise

    def _discard(self, shas):
        """Remove the given blobs if no revision uses them and no other write is in flight (best effort)."""
        try:
            fd = self._lock_fd("write")
        except PcoccError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.info("%s: another write is in flight: unused blobs left to 'repo gc'", self.name)
                return
            with self._meta_lock():
                used = self._used_blobs()
                for sha in shas:
                    if sha not in used:
                        with contextlib.suppress(OSError):
                            os.unlink(self.blob_path(sha))
        except (OSError, PcoccError) as exc:
            log.info("%s: could not remove unused blobs (%s): left to 'repo gc'", self.name, exc)
        finally:
            os.close(fd)

    def writing(self):
        """Held while files are prepared in tmp/ and blobs/, so gc leaves them alone."""
        return self._flock("write", exclusive=False)

    def _meta_lock(self):
        return self._flock("meta", exclusive=True)

    def tmp_path(self, what):
        return self._p("tmp", f"{what}.{os.getpid()}.{uuid.uuid4().hex[:8]}")

    # -- reading
    def image_names(self):
        """Names of the images that have at least one revision, sorted (RepositoryError if unreadable)."""
        try:
            names = os.listdir(self._p("meta"))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self.error("listing its images", exc) from None
        return sorted(n for n in names if self.revisions(n))

    def revisions(self, name):
        """The readable revisions of an image, oldest first ([] if none; RepositoryError if unreadable)."""
        d = self._p("meta", name)
        try:
            files = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self.error(f"listing the revisions of {name}", exc) from None
        revs = []
        for f in files:
            if f.endswith(".json") and f[:-5].isdigit():
                rev = self._load_meta(os.path.join(d, f))
                if rev is not None:
                    revs.append(rev)
        return sorted(revs, key=lambda r: r.revision)

    def _load_meta(self, path):
        try:
            with open(path) as f:
                m = json.load(f)
            return Revision(self, m["name"], int(m["revision"]), tuple(m["layers"]), int(m["size"]),
                            m.get("owner", ""), m.get("timestamp", ""), m.get("description", ""), m.get("boot") or {})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, name, revision=None):
        revs = self.revisions(name)
        if not revs:
            raise NotFoundError(f"no image '{name}' in repository '{self.name}'")
        if revision is None:
            return revs[-1]
        for r in revs:
            if r.revision == revision:
                return r
        raise NotFoundError(f"revision {revision} of image '{self.name}:{name}'{self._why_missing(name, revision, revs)} "
                            f"(revisions: {', '.join(str(r.revision) for r in revs)})")

    def _why_missing(self, name, revision, revs):
        """Why a revision absent from revs (the image's, oldest first) is missing: deleted (below
        the high-water mark: numbers are never reused) or never made."""
        deleted = revision <= max(self.high_water(name), revs[-1].revision)
        return " was deleted (numbers are never reused)" if deleted else " does not exist"

    def high_water(self, name):
        """The highest revision number image name ever had (published, then deleted), or -1."""
        rev = self._load_meta(self._p("meta", name, HIGH_WATER))
        return rev.revision if rev is not None else -1

    # -- writing (callers hold transaction() or writing() while they prepare files)
    def store_blob(self, tmpfile, added=None):
        """Move a finished file from tmp/ into blobs/ under its hash; return the hash.

        The file is fsynced first and made read-only (file_mode()). added: the
        list of a transaction(), to which the hash is appended when this call
        created the blob.
        """
        sha = sha256_file(tmpfile)
        dest = self.blob_path(sha)
        if os.path.exists(dest):
            os.unlink(tmpfile)
        else:
            fd = os.open(tmpfile, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmpfile, self.file_mode())
            os.rename(tmpfile, dest)
            if added is not None:
                added.append(sha)
            fsync_dir(self._p("blobs"))
        return sha

    def commit(self, name, layers, size, owner, new_image=False, description="", boot=None):
        """Publish a new revision of name and return it.

        Its number is one more than the highest the image ever had, deleted
        revisions included (revision 0 for a name never used): numbers are never
        reused. new_image: refuse (ImageExists) if the image has revisions.
        Every blob named must be in the repository (RepositoryError if not).
        The metadata is written to tmp/, fsynced and linked into meta/NAME/ (a
        link never overwrites); on failure nothing is left (no file, no empty
        directory). Raises RepositoryFull/RepositoryDenied/RepositoryError.
        """
        boot = boot or {}
        with self.io(f"publishing a revision of {self.name}:{name}"), self._meta_lock():
            existing = self.revisions(name)
            if new_image and existing:
                raise ImageExists(f"image '{self.name}:{name}' already exists", "Delete it first, or choose another name.")
            for sha in list(layers) + [v for k, v in boot.items() if k in ("kernel", "initrd") and v]:
                if not os.path.isfile(self.blob_path(sha)):
                    raise RepositoryError(f"repository '{self.name}': blob {sha[:12]} vanished before {name} was published",
                                          "Was 'repo gc' run by hand meanwhile? Try again.")
            rev = max(existing[-1].revision if existing else -1, self.high_water(name)) + 1
            meta = {
                "name": name, "revision": rev, "layers": list(layers), "size": size, "owner": owner,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "description": description, "boot": boot,
            }
            tmp = self.tmp_path("meta")
            d = self._p("meta", name)
            made_dir = False
            try:
                self._write_file(tmp, json.dumps(meta, indent=1).encode())
                if not os.path.isdir(d):
                    os.mkdir(d, 0o700 if self.private else 0o777)
                    made_dir = True
                os.link(tmp, os.path.join(d, f"{rev}.json"))  # fails if it exists: never overwrite
                fsync_dir(d)
            except BaseException:
                if made_dir:
                    with contextlib.suppress(OSError):
                        os.rmdir(d)
                raise
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return self._load_meta(os.path.join(d, f"{rev}.json"))

    def delete(self, name, revision=None):
        """Delete one revision, or every revision of an image; return what was deleted.

        The highest revision deleted becomes the image's high-water mark (renamed
        to meta/NAME/.high-water, which needs no new inode or space: deleting
        works on a full file system), so its number is never given again.
        Blobs stay until `repo gc`. Raises NotFoundError, RepositoryDenied or
        RepositoryError; an error leaves every revision not yet deleted in place.
        """
        with self.io(f"deleting {self.name}:{name}"), self._meta_lock():
            all_revs = self.revisions(name)
            revs = [self.get(name, revision)] if revision is not None else all_revs
            if not revs:
                raise NotFoundError(f"no image '{name}' in repository '{self.name}'")
            d = self._p("meta", name)
            top = revs[-1] if revision is None else revs[0]
            for r in revs:
                path = os.path.join(d, f"{r.revision}.json")
                if r is top and r.revision == all_revs[-1].revision and r.revision > self.high_water(name):
                    os.rename(path, os.path.join(d, HIGH_WATER))  # atomic: the mark replaces the old one
                else:
                    os.unlink(path)
            fsync_dir(d)
            return revs

    def _used_blobs(self):
        used = set()
        for name in self.image_names():
            for r in self.revisions(name):
                used.update(r.layers)
                used.update(v for k, v in r.boot.items() if k in ("kernel", "initrd") and v)
        return used

    def gc(self):
        """Remove blobs no revision uses, leftover tmp files and empty image directories.

        Returns (files, bytes) removed. Waits for the writes in flight
        (exclusive write lock). Raises RepositoryDenied/RepositoryError.
        """
        removed, freed = 0, 0
        with self.io("collecting unused blobs"), self._flock("write", exclusive=True), self._meta_lock():  # no write in flight
            used = self._used_blobs()
            for d, keep in (("blobs", used), ("tmp", set())):
                for f in os.listdir(self._p(d)):
                    if f not in keep:
                        path = self._p(d, f)
                        freed += os.path.getsize(path)
                        os.unlink(path)
                        removed += 1
            for n in os.listdir(self._p("meta")):
                if self._empty_dir(self._p("meta", n)):  # left by older versions' failed writes
                    with contextlib.suppress(OSError):
                        os.rmdir(self._p("meta", n))
                        removed += 1
        return removed, freed

    def verify(self):
        """Every problem found: missing or corrupt blobs, broken chains, unreadable metadata.

        Returns a list of one-line strings (empty: the repository is sound).
        Holds writing() so that gc cannot run meanwhile; revisions deleted
        while it reads are skipped, not reported. Raises RepositoryError if the
        repository itself cannot be read.
        """
        problems = []
        with self.io("verifying"), self.writing():  # keeps gc away while we read
            checked = {}
            for name, path in self._meta_files():
                rev = self._load_meta(path)
                if rev is None:
                    if os.path.lexists(path):  # else: deleted meanwhile
                        problems.append(f"{path}: unreadable metadata")
                    continue
                if rev.name != name or f"{rev.revision}.json" != os.path.basename(path):
                    problems.append(f"{path}: metadata of {rev.name}@{rev.revision} in the wrong place")
                found = []
                parent = None
                for sha in rev.layers:
                    found += self._verify_blob(rev, sha, checked)
                    backing = checked.get(sha)
                    if backing is not None:  # None: missing or unreadable, already reported
                        expected = f"../blobs/{parent}" if parent else ""
                        if backing != expected:
                            found.append(f"{rev.uri}: layer {sha[:12]} is backed by {backing!r}, expected {expected!r}")
                    parent = sha
                for key in ("kernel", "initrd"):
                    if rev.boot.get(key):
                        found += self._verify_blob(rev, rev.boot[key], checked, qcow=False)
                if found and os.path.lexists(path):
                    problems += found
        return problems

    def _meta_files(self):
        """(image name, path) of every revision's metadata file, in order; tolerant of concurrent deletes."""
        root = self._p("meta")
        try:
            names = sorted(os.listdir(root))
        except FileNotFoundError:
            return
        for name in names:
            try:
                files = os.listdir(os.path.join(root, name))
            except (FileNotFoundError, NotADirectoryError):
                continue
            revs = sorted((int(f[:-5]), f) for f in files if f.endswith(".json") and f[:-5].isdigit())
            for _, f in revs:
                yield name, os.path.join(root, name, f)

    def leftovers(self):
        """What `repo gc` would remove now: unused blobs, tmp files, empty image directories (one-line strings)."""
        out = []
        with self.io("listing leftovers"), self._meta_lock():
            used = self._used_blobs()
            for d in ("blobs", "tmp"):
                with contextlib.suppress(FileNotFoundError):
                    out += [f"{d}/{f}" for f in sorted(os.listdir(self._p(d))) if d == "tmp" or f not in used]
            with contextlib.suppress(FileNotFoundError):
                out += [f"meta/{n}/" for n in sorted(os.listdir(self._p("meta"))) if self._empty_dir(self._p("meta", n))]
        return out

    @staticmethod
    def _empty_dir(path):
        try:
            return os.path.isdir(path) and not os.listdir(path)
        except OSError:
            return False

    def _verify_blob(self, rev, sha, checked, qcow=True):
        if sha in checked:
            return []
        path = self.blob_path(sha)
        checked[sha] = None
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            return [f"{rev.uri}: missing blob {sha}"]
        except OSError as exc:
            return [f"{rev.uri}: blob {sha} unreadable: {exc.strerror}"]
        if actual != sha:
            return [f"{rev.uri}: blob {sha} is corrupt (its content does not match its hash)"]
        if qcow:
            try:
                checked[sha] = qcow2.read_header(path)[1] or ""  # "": a base layer
            except (OSError, ValueError) as exc:
                return [f"{rev.uri}: {exc}"]
        return []


def copy_blob(src_repo, dst_repo, sha, added=None):
    """Copy one blob between repositories (a no-op when the target has it).

    Call inside dst_repo.transaction() (added: its list). The copy goes to
    tmp/ first and is removed on any error; RepositoryError if the source
    blob's content does not match its hash.
    """
    if os.path.exists(dst_repo.blob_path(sha)):
        return
    tmp = dst_repo.tmp_path("copy")
    try:
        shutil.copyfile(src_repo.blob_path(sha), tmp)
        if dst_repo.store_blob(tmp, added) != sha:
            raise RepositoryError(f"blob {sha[:12]} of repository '{src_repo.name}' does not match its hash",
                                  f"Run 'pcocc image verify -R {src_repo.name}'.")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
