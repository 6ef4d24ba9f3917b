"""The original pcocc's image repositories (its layout version 2), read and written in place.

A site that migrates shares its repositories between the original pcocc
(v0.7.x) and this one, so pcocc reads and writes them as they are, following
the original's rules (its man pages pcocc-image(1), pcocc-repos.yaml(5), and
its repository code), never converting them:

    .config                 YAML {version: 2}; version 1 (metadata under meta/<xx>/<hash>) is
                            refused: the original converts it to version 2 in its own
                            `pcocc image repo gc REPO`
    data/<xx>/<sha256>      the blobs: qcow2 layers (xx: the hash's first two hex digits);
                            a layer's backing file is "../../data/<xx>/<sha256>", relative
    meta/<name>@<revision>  one JSON object per revision, checked against the original's schema,
                            which refuses any other key: name (str), revision (int),
                            kind ("vm"; "ctr" for its container images), owner (user name),
                            timestamp (float, seconds since the epoch), data_blobs (hashes,
                            bottom layer first; the last one is the disk a VM boots),
                            optional description (str) and custom_meta (object)
    .tmp/                   the original's work files; pcocc's own are in .tmp/pcocc/
    .lock-write, .lock-meta pcocc's locks between its own processes (the original takes none)

Rules kept from the original:
- revision numbers: an import or a copy is revision 0; a new revision is the
  highest existing revision plus one (a deleted top revision's number is given
  again, unlike pcocc's own repositories);
- write order: every data blob is in data/ before the metadata naming it is
  written, and the original takes no lock: so a blob nobody references may be
  a write of the original in flight. `repo gc` removes an unreferenced blob
  (and a file of .tmp/ that is not pcocc's) only once it is older than
  YOUNG_SECONDS;
- what pcocc adds goes where the schema allows it: the kernel, initrd and
  command line an image boots with are in custom_meta[BOOT_KEY], and the
  kernel and initrd blobs are also listed first in data_blobs, so that the
  original's gc keeps them and its copy takes them along (the original boots
  the last blob, always a disk layer).

pcocc writes its metadata to .tmp/pcocc/ and links it into meta/ (never
overwriting a file there), so a reader never sees a partial file; a failed
write removes what it added and leaves the repository as it was.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid

import yaml

from pcocc.errors import NotFoundError, PermissionDenied, UsageError
from pcocc.fsutil import fsync_dir
from pcocc.images import qcow2
from pcocc.images.repo import ImageExists, Repository, RepositoryError, Revision, sha256_file

CONFIG = ".config"
VERSION = 2
KIND_VM = "vm"
BOOT_KEY = "pcocc-boot"  # custom_meta key of the boot files (ours)
YOUNG_SECONDS = 24 * 3600  # an unreferenced blob younger than this may be an original's write in flight
OWN_TMP = "pcocc"  # pcocc's work directory in .tmp/

_REQUIRED = {"name": str, "revision": int, "data_blobs": list, "kind": str, "owner": str, "timestamp": (int, float)}
_OPTIONAL = {"description": str, "custom_meta": dict}
_HEX = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[a-zA-Z0-9_.-]+")  # the original's object names
log = logging.getLogger(__name__)


def is_upstream(path):
    """Whether the directory path holds a repository of the original pcocc (a `.config` file)."""
    return os.path.lexists(os.path.join(path, CONFIG))


def schema_problem(meta):
    """Why the original pcocc would refuse this metadata (its schema), or None if it accepts it.

    meta: the decoded JSON. Required keys and types as listed in the module's
    docstring; no other key is allowed (the original's additionalProperties: false).
    """
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, kind in _REQUIRED.items():
        if key not in meta:
            return f"no '{key}'"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"'{key}' is not a {_type_name(kind)}"
    for key, kind in _OPTIONAL.items():
        if key in meta and (not isinstance(meta[key], kind)):
            return f"'{key}' is not a {_type_name(kind)}"
    if not all(isinstance(b, str) for b in meta["data_blobs"]):
        return "'data_blobs' holds something else than strings"
    extra = sorted(set(meta) - set(_REQUIRED) - set(_OPTIONAL))
    if extra:
        return f"unknown key(s) {', '.join(extra)} (the original refuses them)"
    return None


def _type_name(kind):
    names = {str: "string", int: "integer", list: "list", dict: "mapping"}
    return "number" if isinstance(kind, tuple) else names[kind]


def blob_hash(ref):
    """The hex digest a data_blobs entry names: 'HEX' or 'sha256:HEX' (the original's container blobs)."""
    return ref.split(":", 1)[1] if ref.startswith("sha256:") else ref


def _hashes_only(meta):
    """Whether every blob a VM revision names (data_blobs, boot files) is a sha256 digest."""
    custom = meta.get("custom_meta") or {}
    boot = custom.get(BOOT_KEY) if isinstance(custom.get(BOOT_KEY), dict) else {}
    refs = [blob_hash(b) for b in meta["data_blobs"]] + [boot.get(k) for k in ("kernel", "initrd") if boot.get(k)]
    return all(isinstance(r, str) and _HEX.fullmatch(r) for r in refs)


class UpstreamRepository(Repository):
    """A repository in the original pcocc's layout version 2, with the interface of Repository.

    Raises RepositoryError (one line) on any use when its .config is
    unreadable or names another version than 2 (version 1: the message names
    the original's upgrade, `pcocc image repo gc REPO`).
    """

    layout = "pcocc-0.7"

    def __init__(self, name, path, scope="user"):
        super().__init__(name, path, scope)
        self._version_checked = False

    # -- layout
    def blob_path(self, sha):
        """data/<xx>/<sha256>: where the blob of a hash is (whether or not it exists)."""
        h = blob_hash(sha)
        return self._p("data", h[:2], h)

    def layer_backing(self, sha):
        """The backing file name a layer on blob sha carries: relative to data/<yy>/ and to .tmp/pcocc/."""
        h = blob_hash(sha)
        return f"../../data/{h[:2]}/{h}"

    def meta_path(self, name, revision):
        return self._p("meta", f"{name}@{revision}")

    def exists(self):
        return is_upstream(self.path)

    def check(self):
        """Refuse (RepositoryError) a repository whose .config does not say version 2."""
        if self._version_checked:
            return
        path = self._p(CONFIG)
        try:
            with open(path, "rb") as f:
                data = yaml.safe_load(f.read(1 << 16))
        except OSError as exc:
            raise self.error(f"reading {CONFIG}", exc) from None
        except yaml.YAMLError:
            data = None
        version = data.get("version") if isinstance(data, dict) else None
        if version == 1:
            raise RepositoryError(
                f"repository '{self.name}' ({self.path}) has the original pcocc's version-1 layout, which pcocc does not read",
                f"Upgrade it to version 2 with the original pcocc: 'pcocc image repo gc {self.name}' (back up its meta/ first).")
        if version != VERSION or not isinstance(version, (int, float)) or isinstance(version, bool):
            what = f"version {version!r}" if version is not None else "no version"
            raise RepositoryError(f"repository '{self.name}' ({self.path}): {path} gives {what}; "
                                  f"pcocc reads the original pcocc's repositories of version {VERSION}")
        self._version_checked = True

    def ensure(self):
        """Check the layout version (the repository exists: pcocc never creates this layout)."""
        self.check()

    def writable(self):
        return os.access(self.path, os.W_OK) and os.access(self._p("meta"), os.W_OK) and os.access(self._p("data"), os.W_OK)

    def tmp_path(self, what):
        """A fresh name in .tmp/pcocc/ (created if needed), two levels below the root as data/<xx>/ is."""
        d = self._p(".tmp", OWN_TMP)
        if not os.path.isdir(d):
            with self.io("creating its work directory"):
                self._mkdir(d)
        return os.path.join(d, f"{what}.{os.getpid()}.{uuid.uuid4().hex[:8]}")

    @contextlib.contextmanager
    def _flock(self, which, exclusive):
        """pcocc's lock between its own processes; a reader that may not create it goes on without."""
        try:
            fd = self._lock_fd(which)
        except PermissionDenied:
            if exclusive or which == "meta":
                raise PermissionDenied(f"repository '{self.name}' ({self.path}) is read-only for you") from None
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- reading
    def _meta_entries(self):
        """{name: {revision: path}} of meta/NAME@REV files (names as the original splits them)."""
        self.check()
        try:
            files = os.listdir(self._p("meta"))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise self.error("listing its images", exc) from None
        out = {}
        for f in files:
            if f.startswith(".") or f.count("@") != 1:
                continue
            name, rev = f.split("@")
            if rev.isdigit() and rev.isascii():
                out.setdefault(name, {})[int(rev)] = self._p("meta", f)
        return out

    def read_meta(self, path):
        """The metadata of one file as the original checks it: (dict, None) or (None, why it is refused)."""
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read(1 << 24))
        except FileNotFoundError:
            return None, "deleted"
        except OSError as exc:
            return None, f"unreadable ({exc.strerror})"
        except ValueError:
            return None, "not JSON (or written right now by the original)"
        problem = schema_problem(meta)
        return (None, problem) if problem else (meta, None)

    def _revision(self, meta):
        """The Revision of valid VM metadata (layers: its data_blobs minus the boot files)."""
        custom = meta.get("custom_meta") or {}
        boot = custom.get(BOOT_KEY) if isinstance(custom.get(BOOT_KEY), dict) else {}
        boot_blobs = {boot.get(k) for k in ("kernel", "initrd") if boot.get(k)}
        layers = tuple(blob_hash(b) for b in meta["data_blobs"] if b not in boot_blobs)
        size = 0
        if layers:
            with contextlib.suppress(OSError, ValueError):
                size = qcow2.read_header(self.blob_path(layers[-1]))[0]
        stamp = datetime.datetime.fromtimestamp(meta["timestamp"], datetime.timezone.utc).isoformat(timespec="seconds")
        return Revision(self, meta["name"], meta["revision"], layers, size, meta["owner"], stamp,
                        meta.get("description", ""), dict(boot))

    def _all_revisions(self, name, entries=None):
        """Every readable revision of name, any kind, oldest first."""
        entries = self._meta_entries() if entries is None else entries
        revs = []
        for rev, path in entries.get(name, {}).items():
            meta, _ = self.read_meta(path)
            if meta is not None and meta["name"] == name and meta["revision"] == rev:
                revs.append(meta)
        return sorted(revs, key=lambda m: m["revision"])

    def image_names(self):
        """Names of the VM images that have a readable revision, sorted (container images are left out)."""
        entries = self._meta_entries()
        return sorted(n for n in entries if any(m["kind"] == KIND_VM for m in self._all_revisions(n, entries)))

    def revisions(self, name):
        """The readable revisions of VM image name, oldest first ([] if none).

        A revision whose data_blobs or boot files are not sha256 digests is left
        out (`image verify` names it): a name like '../../x' would point outside
        the repository.
        """
        return [self._revision(m) for m in self._all_revisions(name) if m["kind"] == KIND_VM and m["data_blobs"] and _hashes_only(m)]

    def get(self, name, revision=None):
        """One revision (the latest without revision). Raises NotFoundError, or UsageError for a container image."""
        metas = self._all_revisions(name)
        if metas and all(m["kind"] != KIND_VM for m in metas):
            raise UsageError(f"image '{self.name}:{name}' is a '{metas[-1]['kind']}' image of the original pcocc (a container): "
                             "pcocc runs VM images only")
        return super().get(name, revision)

    def _why_missing(self, name, revision, revs):
        return " does not exist"  # the original gives a deleted revision's number again

    def high_water(self, name):
        """Always -1: the original gives a deleted top revision's number again."""
        return -1

    # -- writing
    def store_blob(self, tmpfile, added=None):
        """Move a finished file into data/<xx>/ under its hash (read-only, fsynced); return the hash."""
        sha = sha256_file(tmpfile)
        dest = self.blob_path(sha)
        if os.path.exists(dest):
            os.unlink(tmpfile)
            return sha
        fd = os.open(tmpfile, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmpfile, self.file_mode())
        d = os.path.dirname(dest)
        if not os.path.isdir(d):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700 if self.private else 0o777)
        os.rename(tmpfile, dest)
        if added is not None:
            added.append(sha)
        fsync_dir(d)
        return sha

    def commit(self, name, layers, size, owner, new_image=False, description="", boot=None):
        """Publish a new revision of name in the original's format and return it.

        Its number: 0 for a new image, else the highest revision plus one (the
        original's rule). The metadata follows the original's schema: kind
        "vm", owner, timestamp, data_blobs (boot blobs first, then the layers),
        description, and custom_meta: the latest revision's, with BOOT_KEY set
        to boot (removed when boot is empty). It is written to .tmp/pcocc/,
        fsynced and linked to meta/NAME@REV (a link never overwrites: if the
        original took that number meanwhile, the next one is tried). size is
        read from the layer itself. Raises ImageExists, UsageError (a name the
        original refuses, or a container image of that name), RepositoryError,
        RepositoryFull, RepositoryDenied; on failure nothing is left.
        """
        boot = {k: v for k, v in (boot or {}).items() if v}
        if not _NAME.fullmatch(name):
            raise UsageError(f"invalid image name '{name}' for the original pcocc's repository '{self.name}'")
        with self.io(f"publishing a revision of {self.name}:{name}"), self._meta_lock():
            existing = self._all_revisions(name)
            if existing and any(m["kind"] != KIND_VM for m in existing):
                raise UsageError(f"image '{self.name}:{name}' is a '{existing[-1]['kind']}' image of the original pcocc (a container): "
                                 "a VM revision cannot be added to it")
            if new_image and existing:
                raise ImageExists(f"image '{self.name}:{name}' already exists", "Delete it first, or choose another name.")
            boot_blobs = [boot[k] for k in ("kernel", "initrd") if boot.get(k)]
            for sha in list(layers) + boot_blobs:
                if not os.path.isfile(self.blob_path(sha)):
                    raise RepositoryError(f"repository '{self.name}': blob {sha[:12]} vanished before {name} was published",
                                          "Was 'repo gc' run meanwhile (by pcocc or the original)? Try again.")
            custom = dict(existing[-1].get("custom_meta") or {}) if existing else {}
            custom.pop(BOOT_KEY, None)
            if boot:
                custom[BOOT_KEY] = boot
            meta = {
                "name": name, "kind": KIND_VM, "owner": owner, "timestamp": time.time(),
                "data_blobs": boot_blobs + list(layers), "custom_meta": custom,
            }
            if description:
                meta["description"] = description
            rev = existing[-1]["revision"] + 1 if existing else 0
            tmp = self.tmp_path("meta")
            try:
                for _ in range(100):
                    meta["revision"] = rev
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    self._write_file(tmp, json.dumps(meta).encode())
                    try:
                        os.link(tmp, self.meta_path(name, rev))
                        break
                    except FileExistsError:  # the original wrote that revision meanwhile
                        rev += 1
                else:
                    raise RepositoryError(f"repository '{self.name}': could not find a free revision number for {name}")
                fsync_dir(self._p("meta"))
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            published, why = self.read_meta(self.meta_path(name, rev))
            if published is None:
                raise RepositoryError(f"repository '{self.name}': {name}@{rev} was published but cannot be read back ({why})")
            return self._revision(published)

    def delete(self, name, revision=None):
        """Delete one revision, or every revision of an image (the original's `image delete`); return them.

        Blobs stay until `repo gc`. Numbers are not kept: the original gives a
        deleted top revision's number to the next one. Raises NotFoundError,
        RepositoryDenied or RepositoryError.
        """
        with self.io(f"deleting {self.name}:{name}"), self._meta_lock():
            revs = [self.get(name, revision)] if revision is not None else self.revisions(name)
            if not revs:
                raise NotFoundError(f"no image '{name}' in repository '{self.name}'")
            for r in revs:
                os.unlink(self.meta_path(name, r.revision))
            fsync_dir(self._p("meta"))
            return revs

    def _used_blobs(self):
        """Hashes of every blob a readable revision names, of any kind (container images included)."""
        entries = self._meta_entries()
        used = set()
        for revs in entries.values():
            for path in revs.values():
                meta, _ = self.read_meta(path)
                if meta is not None:
                    used.update(blob_hash(b) for b in meta["data_blobs"])
        return used

    def _unreadable_metas(self):
        return [path for revs in self._meta_entries().values() for path in revs.values() if self.read_meta(path)[0] is None]

    @staticmethod
    def _age(path, now):
        """Seconds since path (or, for a directory, anything in it) last changed: the newest of mtime and ctime.

        ctime counts too: a rename (how the original moves a blob into data/)
        keeps the mtime of the file's last write but sets its ctime.
        """
        paths = [path]
        if os.path.isdir(path) and not os.path.islink(path):
            for root, dirs, files in os.walk(path):
                paths += [os.path.join(root, f) for f in dirs + files]
        newest = 0.0
        for p in paths:
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                newest = max(newest, st.st_mtime, st.st_ctime)
        return now - newest

    def _collectable(self, used, now):
        """(path, what) of what gc removes: unreferenced blobs and others' .tmp files older than YOUNG_SECONDS, all of ours."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for xx in sorted(os.listdir(self._p("data"))):
                d = self._p("data", xx)
                if not os.path.isdir(d):
                    continue
                for f in sorted(os.listdir(d)):
                    path = os.path.join(d, f)
                    if f not in used and self._age(path, now) >= YOUNG_SECONDS:
                        out.append((path, f"data/{xx}/{f}"))
        with contextlib.suppress(FileNotFoundError):
            for f in sorted(os.listdir(self._p(".tmp"))):
                path = self._p(".tmp", f)
                if f == OWN_TMP and os.path.isdir(path) and not os.path.islink(path):
                    out += [(os.path.join(path, g), f".tmp/{f}/{g}") for g in sorted(os.listdir(path))]
                elif self._age(path, now) >= YOUNG_SECONDS:
                    out.append((path, f".tmp/{f}"))
        return out

    def gc(self):
        """Remove unused blobs and leftover work files, sparing what may be an original's write in flight.

        Returns (files, bytes) removed. An unreferenced blob or a file of .tmp/
        (other than pcocc's own) younger than YOUNG_SECONDS stays: the original
        writes its data before its metadata and takes no lock. Refuses (one line)
        while a metadata file is unreadable: its blobs would look unused.
        """
        removed, freed = 0, 0
        with self.io("collecting unused blobs"), self._flock("write", exclusive=True), self._meta_lock():
            bad = self._unreadable_metas()
            if bad:
                raise RepositoryError(f"repository '{self.name}': {len(bad)} metadata file(s) cannot be read (first: {bad[0]}): "
                                      "nothing removed, as their blobs would look unused", "See 'pcocc image verify'.")
            for path, _ in self._collectable(self._used_blobs(), time.time()):
                try:
                    st = os.lstat(path)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                except FileNotFoundError:
                    continue
                freed += st.st_size
                removed += 1
                parent = os.path.dirname(path)
                if os.path.dirname(parent) == self._p("data"):
                    with contextlib.suppress(OSError):
                        os.rmdir(parent)  # an emptied data/<xx>/, as the original does
        return removed, freed

    def leftovers(self):
        """What `repo gc` would remove now (paths relative to the repository).

        Takes no lock (the original takes none either), so that `image verify`
        works on a repository the caller may only read.
        """
        with self.io("listing leftovers"):
            if self._unreadable_metas():
                return []  # gc would refuse: it removes nothing
            return [what for _, what in self._collectable(self._used_blobs(), time.time())]

    def verify(self):
        """Every problem found, as one-line strings (empty: sound).

        Checks each metadata file against the original's schema and its name
        (NAME@REV must match its name and revision), each blob's hash and place
        (data/<xx>/), each VM layer's backing file (the previous layer, by the
        relative name the original writes; none for the first), and the boot
        files of custom_meta[BOOT_KEY] (listed in data_blobs too). Raises
        RepositoryError when the repository itself cannot be read.
        """
        problems = []
        with self.io("verifying"), self.writing():  # keeps pcocc's gc away while we read
            sound, backing = {}, {}
            for name, revs in sorted(self._meta_entries().items()):
                for rev_no, path in sorted(revs.items()):
                    meta, why = self.read_meta(path)
                    if meta is None:
                        if why != "deleted":
                            problems.append(f"{path}: {why}")
                        continue
                    if meta["name"] != name or meta["revision"] != rev_no:
                        problems.append(f"{path}: metadata of {meta['name']}@{meta['revision']} in the wrong place")
                        continue
                    found = self._verify_revision(f"{self.name}:{name}@{rev_no}", meta, sound, backing)
                    if found and os.path.lexists(path):  # else: deleted meanwhile
                        problems += found
        return problems

    def _verify_revision(self, uri, meta, sound, backing):
        found = []
        for ref in meta["data_blobs"]:
            found += self._verify_blob(uri, blob_hash(ref), sound)
        if meta["kind"] != KIND_VM:
            return found
        if not _hashes_only(meta):
            return found + [f"{uri}: a blob it names is not a sha256 digest: pcocc does not use this revision"]
        rev = self._revision(meta)
        for key in ("kernel", "initrd"):
            if rev.boot.get(key) and rev.boot[key] not in meta["data_blobs"]:
                found.append(f"{uri}: its {key} {rev.boot[key][:12]} is not in its data_blobs (the original's gc would remove it)")
        if not rev.layers:
            found.append(f"{uri}: no disk layer in its data_blobs")
        parent = None
        for sha in rev.layers:
            if sound.get(sha) and sha not in backing:
                try:
                    backing[sha] = qcow2.read_header(self.blob_path(sha))[1] or ""
                except (OSError, ValueError) as exc:
                    backing[sha] = None
                    found.append(f"{uri}: layer {sha[:12]}: {exc}")
            if backing.get(sha) is not None:
                expected = self.layer_backing(parent) if parent else ""
                if backing[sha] != expected:
                    found.append(f"{uri}: layer {sha[:12]} is backed by {backing[sha]!r}, expected {expected!r}")
            parent = sha
        return found

    def _verify_blob(self, uri, sha, sound):
        """Problems of one blob (reported once); sound[sha] tells whether it is whole."""
        if sha in sound:
            return []
        sound[sha] = False
        if not _HEX.fullmatch(sha):
            return [f"{uri}: blob name {sha!r} is not a sha256"]
        try:
            actual = sha256_file(self.blob_path(sha))
        except FileNotFoundError:
            return [f"{uri}: missing blob {sha}"]
        except OSError as exc:
            return [f"{uri}: blob {sha} unreadable: {exc.strerror}"]
        if actual != sha:
            return [f"{uri}: blob {sha} is corrupt (its content does not match its hash)"]
        sound[sha] = True
        return []
