"""The repositories of the configuration, and the image operations on them."""

import os
import re

from pcocc.errors import NotFoundError, UsageError
from pcocc.images import qcow2, qemuimg, uri
from pcocc.images.repo import ImageExists, Repository, copy_blob


class ImageStore:
    def __init__(self, repos, owner):
        """repos: config Repo objects, highest priority first."""
        self.repos = [Repository(r.name, r.path, r.scope) for r in repos]
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
        """The revision an URI names (no repo: first repository that has it; no revision: latest)."""
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

    def list(self, repo=None, regex=None):
        pattern = re.compile(regex) if regex else None
        out = []
        for r in [self.repo(repo)] if repo else self.repos:
            for name in r.image_names():
                if pattern is None or pattern.search(name):
                    out.append(r.get(name))
        return out

    # -- operations
    def import_(self, src, dest, fmt=None, progress=None, description="", boot=None):
        if not os.path.isfile(src):
            raise NotFoundError(f"no such file: {src}")
        fmt = qemuimg.check_format(fmt) if fmt else qemuimg.detect_format(src)
        repo, name = self.target(dest)
        if repo.revisions(name):
            raise ImageExists(f"image '{repo.name}:{name}' already exists", "Delete it first, or choose another name.")
        with repo.writing():
            tmp = repo.tmp_path("import")
            try:
                qemuimg.convert(src, tmp, fmt, "qcow2", progress)
                size = qcow2.read_header(tmp)[0]
                sha = repo.store_blob(tmp)
                boot_blobs = self._store_boot(repo, boot)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return repo.commit(name, [sha], size, self.owner, new_image=True, description=description, boot=boot_blobs)

    @staticmethod
    def _store_boot(repo, boot):
        """Store the kernel and initrd an image boots with (built images carry theirs)."""
        if not boot:
            return {}
        import shutil

        out = {"append": boot.get("append", "")}
        for key in ("kernel", "initrd"):
            if boot.get(key):
                tmp = repo.tmp_path(key)
                shutil.copyfile(boot[key], tmp)
                out[key] = repo.store_blob(tmp)
        return out

    def export(self, src, dest, fmt=None, progress=None):
        rev = self.find(src)
        fmt = qemuimg.check_format(fmt or _format_from_extension(dest))
        if os.path.exists(dest):
            raise UsageError(f"'{dest}' already exists")
        tmp = f"{dest}.part"
        try:
            qemuimg.convert(rev.top, tmp, "qcow2", fmt, progress)
            os.rename(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return rev

    def copy(self, src, dest, progress=None):
        rev = self.find(src)
        repo, name = self.target(dest)
        if repo.revisions(name):
            raise ImageExists(f"image '{repo.name}:{name}' already exists", "Delete it first, or choose another name.")
        boot_shas = [v for k, v in rev.boot.items() if k in ("kernel", "initrd") and v]
        with repo.writing():  # held until the commit: gc must not take the new blobs before
            shas = list(rev.layers) + boot_shas
            for i, sha in enumerate(shas):
                copy_blob(rev.repo, repo, sha)
                if progress:
                    progress(100.0 * (i + 1) / len(shas))
            return repo.commit(name, rev.layers, rev.size, self.owner, new_image=True, description=rev.description, boot=rev.boot)

    def delete(self, text):
        u = uri.parse(text)
        if u.repo:
            return self.repo(u.repo).delete(u.name, u.revision)
        rev = self.find(text)
        return rev.repo.delete(u.name, u.revision)

    def resize(self, text, size):
        rev = self.find(text)
        if size < rev.size:
            raise UsageError(f"cannot shrink '{rev.uri}' ({rev.size} bytes) to {size} bytes")
        return self.add_layer(rev, lambda path: qemuimg.create_layer(path, f"../blobs/{rev.layers[-1]}", size), size)

    def add_layer(self, rev, fill, size=None):
        """A new revision of rev's image with one more layer written by fill(tmp_path)."""
        repo = rev.repo
        with repo.writing():  # held until the commit: gc must not take the new blob before
            tmp = repo.tmp_path("layer")
            try:
                fill(tmp)
                sha = repo.store_blob(tmp)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return repo.commit(rev.name, rev.layers + (sha,), size or rev.size, self.owner, boot=rev.boot, description=rev.description)


    def save_layer(self, rev, fill, dest=None, full=False, description=None):
        """Publish the content of a VM disk based on rev as a new revision; return it.

        fill(tmp_path, backing) writes the layer: backing is the name of its backing
        file, relative to tmp_path's directory, or None for a standalone image
        (full, or dest in another repository). Without dest: the next revision of
        rev's image; with dest ([REPO:]NAME, which must not exist): its revision 0.
        Nothing is published unless fill returned; its file is removed on any error.
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
            from pcocc.errors import PermissionDenied

            raise PermissionDenied(f"repository '{repo.name}' ({repo.path}) is read-only for you",
                                   "Save to an image of your own with -d [REPO:]NAME.")
        with repo.writing():  # held until the commit: gc must not take the new blob before
            tmp = repo.tmp_path("save")
            try:
                fill(tmp, None if full else f"../blobs/{rev.layers[-1]}")  # tmp/ and blobs/ are siblings
                sha = repo.store_blob(tmp)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if not same_repo:
                for key in ("kernel", "initrd"):
                    if rev.boot.get(key):
                        copy_blob(rev.repo, repo, rev.boot[key])
            layers = (sha,) if full else rev.layers + (sha,)
            return repo.commit(name, layers, rev.size, self.owner, new_image=dest is not None,
                               description=rev.description if description is None else description, boot=rev.boot)


def _format_from_extension(path):
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    return {"img": "raw", "vhd": "vpc"}.get(ext, ext) if ext else "qcow2"


def create_overlay(rev, path):
    """The ephemeral disk of a VM: an empty qcow2 on the revision's top layer, in O(1)."""
    qcow2.create_overlay(path, os.path.abspath(rev.top), rev.size)
    return path




def overlay_from(rev, delta, path):
    """The disk of a restarted VM: a copy of a checkpoint's delta, put on the revision's top layer."""
    import shutil

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        shutil.copyfile(delta, tmp)
        qemuimg.rebase_unsafe(tmp, os.path.abspath(rev.top))
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
