"""The repositories of the configuration, and the image operations on them."""

import contextlib
import errno
import json
import os
import re
import shutil
import stat

from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, ResourceError, UsageError
from pcocc.images import legacy_dir, qcow2, qemuimg, upstream, uri
from pcocc.images.repo import ImageExists, Repository, copy_blob, sha256_file


def open_repository(name, path, scope="user"):
    """The repository at path, in the layout found there: the original pcocc's
    (a `.config` file: images.upstream.UpstreamRepository) or pcocc's own
    (images.repo.Repository, also for a path that does not exist yet)."""
    if upstream.is_upstream(path):
        return upstream.UpstreamRepository(name, path, scope)
    return Repository(name, path, scope)


class ImageStore:
    def __init__(self, repos, owner):
        """repos: config Repo objects, highest priority first; owner: the user name written in new revisions."""
        self.repos = [open_repository(r.name, r.path, r.scope) for r in repos]
        self.owner = owner

    def repo(self, name=None):
        """A repository by name; without a name, the first one (the default target)."""
        if not self.repos:
            raise NotFoundError("no image repository configured", "See 'pcocc help repos'.")
        if name is None:
            return self.repos[0]
        for r in self.repos:
            if r.name == name:
                return r
        raise NotFoundError(f"no repository named '{name}' (repositories: {', '.join(r.name for r in self.repos)})")

    def find(self, text):
        """The revision an URI names (no repo: first repository that has it; no revision: latest).

        A value with a '/' is the original pcocc's image directory (images.legacy_dir).
        """
        if legacy_dir.is_dir_form(text):
            return legacy_dir.find(text)
        u = uri.parse(text)
        if u.repo:
            return self.repo(u.repo).get(u.name, u.revision)
        for r in self.repos:
            if r.revisions(u.name):
                return r.get(u.name, u.revision)
        raise NotFoundError(f"no image named '{u.name}' in any repository", "See 'pcocc image list'.")

    def target(self, text):
        """(repository, name) where DEST should be written; DEST must not carry a revision."""
        u = uri.parse(text)
        if u.revision is not None:
            raise UsageError(f"'{text}': a destination cannot name a revision")
        return self.repo(u.repo), u.name

    def list(self, repo=None, regex=None, problems=None):
        """The latest revision of each image (of repo, or of every repository), names matching regex.

        problems: a list to which the one-line error of a repository that cannot
        be read is appended (the others are still listed); without it, that error
        is raised (RepositoryError, e.g. the original's version-1 layout).
        """
        pattern = re.compile(regex) if regex else None
        out = []
        for r in [self.repo(repo)] if repo else self.repos:
            try:
                names = r.image_names()
            except PcoccError as exc:
                if problems is None or repo:
                    raise
                problems.append(exc)
                continue
            for name in names:
                if pattern is None or pattern.search(name):
                    with contextlib.suppress(NotFoundError):  # deleted meanwhile
                        out.append(r.get(name))
        return out

    def find_image(self, name):
        """(repository, name) of the first repository holding a VM image of that name, or None.

        Reads only that image's metadata, repository by repository (no listing of
        every image), in search order: a repository that cannot be read before
        one that holds the image raises its error (RepositoryError), so that a
        lower one's image of the same name is never taken instead. Used for the
        original's per-image templates (templates.TemplateSet).
        """
        for r in self.repos:
            if r.revisions(name):
                return r, name
        return None

    # -- operations
    def import_(self, src, dest, fmt=None, progress=None, description="", boot=None, boot_files=True):
        """Import the disk image file src as image dest (its first revision); return the Revision.

        fmt: src's format (detected when None). boot: {"kernel": path,
        "initrd": path or None, "append": str} the image boots with (built
        images); without it, and when boot_files is true, the files `export`
        writes beside a disk (src.boot.json, src.kernel, src.initrd) are read
        back if there. Raises NotFoundError (src), UsageError (format, name,
        boot files), ImageExists, CommandError (qemu-img), RepositoryFull,
        RepositoryDenied or RepositoryError; on any error the repository is
        left as it was.
        """
        if not os.path.isfile(src):
            raise NotFoundError(f"no such file: {src}")
        fmt = qemuimg.check_format(fmt) if fmt else qemuimg.detect_format(src)
        repo, name = self.target(dest)
        if repo.revisions(name):
            raise ImageExists(f"image '{repo.name}:{name}' already exists", "Delete it first, or choose another name.")
        if boot is None and boot_files:
            boot = read_boot_files(src)
        with repo.transaction(f"importing {src} as {repo.name}:{name}") as added:
            tmp = repo.tmp_path("import")
            try:
                qemuimg.convert(src, tmp, fmt, "qcow2", progress)
                size = qcow2.read_header(tmp)[0]
                sha = repo.store_blob(tmp, added)
                boot_blobs = self._store_boot(repo, boot, added)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return repo.commit(name, [sha], size, self.owner, new_image=True, description=description, boot=boot_blobs)

    @staticmethod
    def _store_boot(repo, boot, added):
        """Store the kernel and initrd an image boots with (built images carry theirs); return the metadata's boot dict."""
        if not boot:
            return {}
        out = {"append": boot.get("append") or ""}
        for key in ("kernel", "initrd"):
            if boot.get(key):
                tmp = repo.tmp_path(key)
                try:
                    shutil.copyfile(boot[key], tmp)
                    out[key] = repo.store_blob(tmp, added)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        return out

    def export(self, src, dest, fmt=None, progress=None):
        """Write image src to the file dest as one flat disk of format fmt (default: from dest's extension).

        An image that boots its own kernel also gets, beside dest, the files
        dest.kernel, dest.initrd (if any) and dest.boot.json (the command line
        and the files' sha256), which `import` reads back. Nothing is written
        if any of them exists (UsageError); every file goes to a .part name
        first and is renamed when complete, the disk last; on any error none is
        left. Returns (Revision, [paths written]).
        """
        rev = self.find(src)
        fmt = qemuimg.check_format(fmt or _format_from_extension(dest))
        boot = rev.boot_files()
        outputs = [dest] + (boot_file_names(dest, with_initrd=bool(boot[1])) if boot else [])
        for path in outputs:
            if os.path.lexists(path):
                raise UsageError(f"'{path}' already exists")
        done, parts = [], []
        try:
            if boot:
                kernel, initrd, append = boot
                manifest = {"format": BOOT_FORMAT, "append": append, "kernel": os.path.basename(outputs[1]),
                            "sha256": {"kernel": rev.boot["kernel"]}}
                copies = [(kernel, outputs[1])]
                if initrd:
                    manifest["initrd"] = os.path.basename(outputs[2])
                    manifest["sha256"]["initrd"] = rev.boot["initrd"]
                    copies.append((initrd, outputs[2]))
                for blob, path in copies:
                    parts.append(f"{path}.part")
                    shutil.copyfile(blob, parts[-1])
                parts.append(f"{outputs[-1]}.part")
                with open(parts[-1], "w") as f:
                    json.dump(manifest, f, indent=1)
                    f.write("\n")
            parts.append(f"{dest}.part")
            qemuimg.convert(rev.top, parts[-1], "qcow2", fmt, progress)
            for part in parts:  # the disk last: a disk without its boot files is never left
                os.rename(part, part[: -len(".part")])
                done.append(part[: -len(".part")])
        except BaseException as exc:
            for path in parts + done:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if isinstance(exc, OSError):
                raise _write_error(dest, exc) from None
            raise
        return rev, done

    def copy(self, src, dest, progress=None):
        """Copy image src (one revision) to the new image dest, with its boot files; return the new Revision."""
        rev = self.find(src)
        repo, name = self.target(dest)
        if repo.revisions(name):
            raise ImageExists(f"image '{repo.name}:{name}' already exists", "Delete it first, or choose another name.")
        boot_shas = [v for k, v in rev.boot.items() if k in ("kernel", "initrd") and v]
        with repo.transaction(f"copying {rev.uri} to {repo.name}:{name}") as added:  # until the commit: gc must not take the new blobs
            shas = list(rev.layers) + boot_shas
            layers = []
            for i, sha in enumerate(shas):
                if i < len(rev.layers) and layers and rev.repo.layer_backing(sha) != repo.layer_backing(sha):
                    layers.append(_copy_rebased(rev.repo, repo, sha, layers[-1], added))  # another layout: another backing name
                else:
                    copy_blob(rev.repo, repo, sha, added)
                    if i < len(rev.layers):
                        layers.append(sha)
                if progress:
                    progress(100.0 * (i + 1) / len(shas))
            return repo.commit(name, layers, rev.size, self.owner, new_image=True, description=rev.description, boot=rev.boot)

    def delete(self, text):
        """Delete the revisions an URI names (one with @REV, else all); return them. See Repository.delete."""
        u = uri.parse(text)
        if u.repo:
            return self.repo(u.repo).delete(u.name, u.revision)
        rev = self.find(text)
        return rev.repo.delete(u.name, u.revision)

    def resize(self, text, size):
        """A new revision of an image grown to size bytes (UsageError to shrink)."""
        rev = self.find(text)
        if size < rev.size:
            raise UsageError(f"cannot shrink '{rev.uri}' ({rev.size} bytes) to {size} bytes")
        return self.add_layer(rev, lambda path: qemuimg.create_layer(path, rev.repo.layer_backing(rev.layers[-1]), size), size)

    def add_layer(self, rev, fill, size=None):
        """A new revision of rev's image with one more layer written by fill(tmp_path)."""
        repo = rev.repo
        with repo.transaction(f"adding a revision to {repo.name}:{rev.name}") as added:
            tmp = repo.tmp_path("layer")
            try:
                fill(tmp)
                sha = repo.store_blob(tmp, added)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return repo.commit(rev.name, rev.layers + (sha,), size or rev.size, self.owner, boot=rev.boot, description=rev.description)

    def save_layer(self, rev, fill, dest=None, full=False, description=None, before_commit=None):
        """Publish the content of a VM disk based on rev as a new revision; return it.

        fill(tmp_path, backing) writes the layer: backing is the name of its backing
        file, relative to tmp_path's directory, or None for a standalone image
        (full, or dest in another repository). Without dest: the next revision of
        rev's image; with dest ([REPO:]NAME, which must not exist): its first revision.
        Nothing is published unless fill returned; on any error (Ctrl-C included)
        its file and the blobs this save added are removed. before_commit(), if
        given, is called at the last moment before the commit, inside the
        repository's transaction: what it raises aborts the save. Raises ImageExists,
        PermissionDenied, RepositoryFull, RepositoryError, or what fill raised.
        """
        if dest is not None:
            repo, name = self.target(dest)
            if repo.revisions(name):
                raise ImageExists(f"image '{repo.name}:{name}' already exists", "Delete it first, or choose another name.")
        else:
            repo, name = rev.repo, rev.name
        same_repo = os.path.realpath(repo.path) == os.path.realpath(rev.repo.path)
        full = full or not same_repo  # a layer never points into another repository
        repo.ensure()
        if not repo.writable():
            raise PermissionDenied(f"repository '{repo.name}' ({repo.path}) is read-only for you",
                                   "Save to an image of your own with -d [REPO:]NAME.")
        with repo.transaction(f"saving a revision of {repo.name}:{name}") as added:  # until the commit: gc must not take the new blob
            tmp = repo.tmp_path("save")
            try:
                fill(tmp, None if full else repo.layer_backing(rev.layers[-1]))  # valid from the tmp dir and from the blob's
                sha = repo.store_blob(tmp, added)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if not same_repo:
                for key in ("kernel", "initrd"):
                    if rev.boot.get(key):
                        copy_blob(rev.repo, repo, rev.boot[key], added)
            layers = (sha,) if full else rev.layers + (sha,)
            if before_commit is not None:
                before_commit()
            return repo.commit(name, layers, rev.size, self.owner, new_image=dest is not None,
                               description=rev.description if description is None else description, boot=rev.boot)


def _copy_rebased(src_repo, dst_repo, sha, parent, added):
    """Copy layer sha into dst_repo with its backing file renamed to parent's name there; return its new hash.

    Between pcocc's layout and the original's, the same chain has other backing
    names (`../blobs/H` and `../../data/xx/H`), so a copied layer is a new blob.
    Call inside dst_repo.transaction() (added: its list).
    """
    tmp = dst_repo.tmp_path("copy")
    try:
        shutil.copyfile(src_repo.blob_path(sha), tmp)
        if sha256_file(tmp) != sha:
            raise PcoccError(f"blob {sha[:12]} of repository '{src_repo.name}' does not match its hash",
                             f"Run 'pcocc image verify -R {src_repo.name}'.")
        os.chmod(tmp, 0o600)
        qemuimg.rebase_unsafe(tmp, dst_repo.layer_backing(parent))
        return dst_repo.store_blob(tmp, added)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


BOOT_FORMAT = 1
BOOT_FILE_MAX = 1 << 30  # a kernel or initrd larger than 1 GiB is not one


def boot_file_names(disk, with_initrd=True):
    """The files beside an exported disk: [disk.kernel, disk.initrd, disk.boot.json] (no initrd if not with_initrd)."""
    return [f"{disk}.kernel"] + ([f"{disk}.initrd"] if with_initrd else []) + [f"{disk}.boot.json"]


def read_boot_files(disk):
    """The boot dict (kernel, initrd, append) of the files `export` wrote beside disk, or None if there are none.

    Reads disk.boot.json: {"format": 1, "kernel": NAME, "initrd": NAME (optional),
    "append": str, "sha256": {"kernel": hex, "initrd": hex} (optional)}; NAME is a
    file in disk's directory (no path). Raises UsageError (one line, naming the
    file) if the manifest is malformed, names a missing file, or a file does
    not match its sha256.
    """
    manifest = f"{disk}.boot.json"
    if not os.path.lexists(manifest):
        return None

    def bad(what):
        return UsageError(f"{manifest}: {what}", "Fix or remove it, or import with --no-boot-files.")

    try:
        with open(manifest, "rb") as f:
            data = json.loads(f.read(1 << 16))
    except (OSError, ValueError) as exc:
        raise bad(f"unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(data, dict) or data.get("format") != BOOT_FORMAT:
        raise bad(f"not a pcocc boot manifest of format {BOOT_FORMAT}")
    append = data.get("append", "")
    sums = data.get("sha256") or {}
    if not isinstance(append, str) or "\0" in append or not isinstance(sums, dict):
        raise bad("'append' must be a string and 'sha256' a map")
    out = {"append": append}
    for key in ("kernel", "initrd"):
        fname = data.get(key)
        if fname is None and key == "initrd":
            continue
        if not isinstance(fname, str) or not fname or "/" in fname or fname in (".", ".."):
            raise bad(f"'{key}' must name a file beside the disk")
        path = os.path.join(os.path.dirname(os.path.abspath(disk)), fname)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise bad(f"its {key} {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size > BOOT_FILE_MAX:
            raise bad(f"its {key} {path} is not a regular file of at most {BOOT_FILE_MAX >> 20} MiB")
        if sums.get(key) is not None and sha256_file(path) != sums[key]:
            raise bad(f"its {key} {path} does not match its sha256")
        out[key] = path
    return out


def _write_error(dest, exc):
    """The one-line error of a file that could not be written outside the repositories."""
    reason = (exc.strerror or str(exc)).lower()
    where = exc.filename or dest
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"cannot write {where}: {reason}", "Nothing was left there; free some space, or export elsewhere.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"cannot write {where}: {reason}")
    return PcoccError(f"cannot write {where}: {reason}")


def _format_from_extension(path):
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    return {"img": "raw", "vhd": "vpc"}.get(ext, ext) if ext else "qcow2"


def create_overlay(rev, path):
    """The ephemeral disk of a VM: an empty qcow2 on the revision's top layer, in O(1)."""
    qcow2.create_overlay(path, os.path.abspath(rev.top), rev.size)
    return path




def overlay_from(rev, delta, path):
    """The disk of a restarted VM: a copy of a checkpoint's delta, put on the revision's top layer."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        shutil.copyfile(delta, tmp)
        qemuimg.rebase_unsafe(tmp, os.path.abspath(rev.top))
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
