"""Images given as a directory: the original pcocc's older template form.

A template's `image:` may name a directory (pcocc-templates.yaml(5): "Path to a
directory containing a boot disk image") that holds `image` (revision 0) and
`image-revN` files (revision N, each a qcow2 layer over the previous one, as the
original's `save` wrote them). As in the original, a value with a path separator
is such a directory, anything else an image of a repository. A VM boots the
highest revision; `DIR@N` names revision N. These images are read in place and
never written: `pcocc save` of such a VM needs `-d [REPO:]NAME`.
"""

import os
import re
from dataclasses import dataclass

from pcocc.errors import NotFoundError, UsageError
from pcocc.images import qcow2
from pcocc.images.repo import Revision
from pcocc.names import shown

_REV_FILE = re.compile(r"image-rev(\d+)")


def is_dir_form(text):
    """Whether an image value names a directory rather than [REPO:]NAME[@REV] (it holds a '/')."""
    return os.sep in text


def revisions(directory):
    """{revision: file name} of a directory image: 0 for `image`, N for each `image-revN`.

    Raises NotFoundError (one line) when the directory cannot be read.
    """
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise NotFoundError(f"image directory {directory}: {exc.strerror}") from None
    out = {int(m[1]): n for n in names if (m := _REV_FILE.fullmatch(n)) and os.path.isfile(os.path.join(directory, n))}
    if os.path.isfile(os.path.join(directory, "image")):
        out.setdefault(0, "image")
    return out


class DirectoryImages:
    """Stands for a repository in a Revision of a directory image: where its files are.

    It cannot be written: the methods a save calls on its source repository refuse.
    """

    scope = "legacy"

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.name = self.path

    def blob_path(self, layer):
        return os.path.join(self.path, layer)

    def _refuse(self, *args, **kwargs):
        raise UsageError(f"image directory {self.path} is read-only for pcocc (the original pcocc's older form)",
                         "Save to an image of a repository with -d [REPO:]NAME.")

    ensure = writable = transaction = _refuse


@dataclass(frozen=True)
class DirectoryRevision(Revision):
    """A revision of a directory image: its one layer is the revision's file."""

    @property
    def uri(self):
        return f"{self.repo.path}@{self.revision}"


def find(text):
    """The DirectoryRevision a `DIR` or `DIR@N` value names (the highest revision without @N).

    Raises NotFoundError when the directory holds no image or not that revision,
    UsageError when the file is not a qcow2 image (the form the original wrote).
    """
    if not text.isprintable():  # e.g. a NUL, which no path may hold
        raise UsageError(f"invalid image directory {shown(text)}: it holds a control character")
    directory, revision = text, None
    m = re.fullmatch(r"(.*)@(\d+)", text)
    if m and not os.path.isdir(text):
        directory, revision = m[1], int(m[2])
    directory = directory.rstrip(os.sep) or os.sep
    revs = revisions(directory)
    if not revs:
        raise NotFoundError(f"image directory {directory} holds no image (no file 'image' or 'image-revN')")
    if revision is None:
        revision = max(revs)
    elif revision not in revs:
        raise NotFoundError(f"image directory {directory} has no revision {revision} (revisions: {', '.join(map(str, sorted(revs)))})")
    repo = DirectoryImages(directory)
    path = repo.blob_path(revs[revision])
    try:
        size = qcow2.read_header(path)[0]
    except ValueError:
        raise UsageError(f"{path} is not a qcow2 image", f"Convert it: qemu-img convert -O qcow2 {path} {path}.qcow2, "
                         "then import that with 'pcocc image import'.") from None
    except OSError as exc:
        raise NotFoundError(f"{path}: {exc.strerror}") from None
    st = os.stat(path)
    return DirectoryRevision(repo, os.path.basename(directory), revision, (revs[revision],), size, owner=str(st.st_uid))
