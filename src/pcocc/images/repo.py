"""Image repositories: content-addressed immutable layers plus one metadata file per revision.

Layout of a repository directory:
    .pcocc-repo             {"version": 1}
    .lock-write             flock: shared while a write is in flight, exclusive for gc
    .lock-meta              flock: exclusive to publish or delete a revision
    blobs/<sha256>          qcow2 layers, read-only; a layer's backing file is "../blobs/<sha256>",
                            so the repository can be moved or mounted elsewhere
    meta/<name>/<rev>.json  one revision: layers bottom to top, owner, timestamp, size
    tmp/                    work files; renamed into blobs/ and meta/ when complete

A revision becomes visible only by an atomic link of its complete metadata file,
so a writer killed at any moment leaves nothing partial behind (only tmp files
and unreferenced blobs, which `repo gc` removes).
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field

from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, UsageError
from pcocc.images import qcow2

FORMAT_VERSION = 1


class ImageExists(UsageError):
    """The destination image exists already (a usage error: choose another name)."""


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
        """(kernel path, initrd path or None, append) when the image carries its kernel."""
        if not self.boot.get("kernel"):
            return None
        initrd = self.boot.get("initrd")
        return self.repo.blob_path(self.boot["kernel"]), self.repo.blob_path(initrd) if initrd else None, self.boot.get("append", "")

    def disk_usage(self):
        return sum(os.path.getsize(self.repo.blob_path(s)) for s in self.layers if os.path.exists(self.repo.blob_path(s)))

    def to_json(self):
        return {
            "repo": self.repo.name, "name": self.name, "revision": self.revision, "uri": self.uri,
            "layers": list(self.layers), "size": self.size, "owner": self.owner,
            "timestamp": self.timestamp, "description": self.description, "boot": self.boot,
        }


class Repository:
    def __init__(self, name, path, scope="user"):
        self.name = name
        self.path = path
        self.scope = scope

    # -- layout
    def _p(self, *parts):
        return os.path.join(self.path, *parts)

    def blob_path(self, sha):
        return self._p("blobs", sha)

    def exists(self):
        return os.path.isfile(self._p(".pcocc-repo"))

    def writable(self):
        return os.access(self.path if os.path.isdir(self.path) else os.path.dirname(self.path) or ".", os.W_OK)

    def ensure(self):
        """Create the repository layout if needed (for writing)."""
        if self.exists():
            return
        try:
            for d in ("blobs", "meta", "tmp"):
                os.makedirs(self._p(d), exist_ok=True)
            tmp = self._p(f".pcocc-repo.{os.getpid()}")  # several processes may create it at once
            with open(tmp, "w") as f:
                json.dump({"version": FORMAT_VERSION}, f)
            os.replace(tmp, self._p(".pcocc-repo"))
        except PermissionError:
            raise PermissionDenied(f"cannot create repository '{self.name}' in {self.path}: permission denied") from None

    @contextlib.contextmanager
    def _flock(self, which, exclusive):
        self.ensure()
        path = self._p(f".lock-{which}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # a repository we may only read: flock works on a read-only fd too
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                raise PermissionDenied(f"repository '{self.name}' ({self.path}) is read-only for you") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
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
        try:
            return sorted(n for n in os.listdir(self._p("meta")) if self.revisions(n))
        except FileNotFoundError:
            return []

    def revisions(self, name):
        d = self._p("meta", name)
        try:
            files = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
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
        raise NotFoundError(f"no revision {revision} of image '{name}' in repository '{self.name}' (revisions: {', '.join(str(r.revision) for r in revs)})")

    # -- writing (callers hold writing() while they prepare files)
    def store_blob(self, tmpfile):
        """Move a finished file from tmp/ into blobs/ under its hash; return the hash."""
        sha = sha256_file(tmpfile)
        dest = self.blob_path(sha)
        if os.path.exists(dest):
            os.unlink(tmpfile)
        else:
            os.chmod(tmpfile, 0o444)
            os.rename(tmpfile, dest)
        return sha

    def commit(self, name, layers, size, owner, new_image=False, description="", boot=None):
        """Publish a new revision of name (revision 0 of a new image when new_image)."""
        with self._meta_lock():
            existing = self.revisions(name)
            if new_image and existing:
                raise ImageExists(f"image '{self.name}:{name}' already exists", "Delete it first, or choose another name.")
            rev = existing[-1].revision + 1 if existing else 0
            meta = {
                "name": name, "revision": rev, "layers": list(layers), "size": size, "owner": owner,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "description": description, "boot": boot or {},
            }
            os.makedirs(self._p("meta", name), exist_ok=True)
            tmp = self.tmp_path("meta")
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self._p("meta", name, f"{rev}.json"))  # fails if it exists: never overwrite
            finally:
                os.unlink(tmp)
            return self._load_meta(self._p("meta", name, f"{rev}.json"))

    def delete(self, name, revision=None):
        """Delete one revision, or every revision of an image; return what was deleted."""
        with self._meta_lock():
            revs = [self.get(name, revision)] if revision is not None else self.revisions(name)
            if not revs:
                raise NotFoundError(f"no image '{name}' in repository '{self.name}'")
            for r in revs:
                os.unlink(self._p("meta", name, f"{r.revision}.json"))
            with contextlib.suppress(OSError):
                os.rmdir(self._p("meta", name))
            return revs

    def gc(self):
        """Remove blobs no revision uses and leftover tmp files; return (files, bytes) removed."""
        removed, freed = 0, 0
        with self._flock("write", exclusive=True), self._meta_lock():  # no write in flight
            used = set()
            for name in self.image_names():
                for r in self.revisions(name):
                    used.update(r.layers)
                    used.update(v for k, v in r.boot.items() if k in ("kernel", "initrd") and v)
            for d, keep in (("blobs", used), ("tmp", set())):
                for f in os.listdir(self._p(d)):
                    if f not in keep:
                        path = self._p(d, f)
                        freed += os.path.getsize(path)
                        os.unlink(path)
                        removed += 1
        return removed, freed

    def verify(self):
        """Every problem found: missing or corrupt blobs, broken chains, unreadable metadata."""
        problems = []
        with self.writing():  # keeps gc away while we read
            checked = {}
            meta_root = self._p("meta")
            for name in sorted(os.listdir(meta_root)):
                for f in sorted(os.listdir(os.path.join(meta_root, name))):
                    path = os.path.join(meta_root, name, f)
                    rev = self._load_meta(path)
                    if rev is None:
                        problems.append(f"{path}: unreadable metadata")
                        continue
                    parent = None
                    for sha in rev.layers:
                        problems += self._verify_blob(rev, sha, checked)
                        backing = checked.get(sha)
                        if backing is not None:  # None: missing or unreadable, already reported
                            expected = f"../blobs/{parent}" if parent else ""
                            if backing != expected:
                                problems.append(f"{rev.uri}: layer {sha[:12]} is backed by {backing!r}, expected {expected!r}")
                        parent = sha
                    for key in ("kernel", "initrd"):
                        if rev.boot.get(key):
                            problems += self._verify_blob(rev, rev.boot[key], checked, qcow=False)
        return problems

    def _verify_blob(self, rev, sha, checked, qcow=True):
        if sha in checked:
            return []
        path = self.blob_path(sha)
        checked[sha] = None
        if not os.path.exists(path):
            return [f"{rev.uri}: missing blob {sha}"]
        if sha256_file(path) != sha:
            return [f"{rev.uri}: blob {sha} is corrupt (its content does not match its hash)"]
        if qcow:
            try:
                checked[sha] = qcow2.read_header(path)[1] or ""  # "": a base layer
            except ValueError as exc:
                return [f"{rev.uri}: {exc}"]
        return []


def copy_blob(src_repo, dst_repo, sha):
    """Copy one blob between repositories (a no-op when the target has it)."""
    if os.path.exists(dst_repo.blob_path(sha)):
        return
    tmp = dst_repo.tmp_path("copy")
    shutil.copyfile(src_repo.blob_path(sha), tmp)
    if dst_repo.store_blob(tmp) != sha:
        raise PcoccError(f"blob {sha} changed while copying from {src_repo.name}")
