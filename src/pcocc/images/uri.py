"""Image URIs: [REPO:]NAME[@REV]."""

import re
from dataclasses import dataclass

from pcocc.errors import UsageError

NAME_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]*")
_URI_RE = re.compile(r"(?:(?P<repo>[a-zA-Z][a-zA-Z0-9_.-]*):)?(?P<name>[^:@/]+)(?:@(?P<rev>\d+))?")


@dataclass(frozen=True)
class ImageURI:
    name: str
    repo: str = None
    revision: int = None

    def __str__(self):
        text = f"{self.repo}:{self.name}" if self.repo else self.name
        return text if self.revision is None else f"{text}@{self.revision}"


def parse(text):
    m = _URI_RE.fullmatch(text.strip())
    if not m or not NAME_RE.fullmatch(m["name"]):
        raise UsageError(
            f"invalid image name '{text}'",
            "Images are named [REPO:]NAME[@REVISION], NAME made of letters, digits, _ . - (e.g. user:centos@2).",
        )
    return ImageURI(m["name"], m["repo"], int(m["rev"]) if m["rev"] is not None else None)
