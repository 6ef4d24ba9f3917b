"""The qemu-img driver: formats, conversion with progress, layer creation."""

import json
import re

from pcocc.errors import CommandError, UsageError
from pcocc.runner import run, stream

FORMATS = ("raw", "qcow2", "qed", "vdi", "vpc", "vmdk")
_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def info(path):
    try:
        return json.loads(run(["qemu-img", "info", "--output=json", path]).stdout)
    except CommandError as exc:
        raise UsageError(f"cannot read image '{path}': {exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else exc}") from None


def detect_format(path):
    fmt = info(path)["format"]
    if fmt not in FORMATS:
        raise UsageError(f"'{path}' is a {fmt} image; supported formats: {', '.join(FORMATS)}")
    return fmt


def check_format(fmt):
    if fmt not in FORMATS:
        raise UsageError(f"unknown image format '{fmt}'", f"Supported formats: {', '.join(FORMATS)}")
    return fmt


def convert(src, dst, src_fmt, dst_fmt, progress=None):
    """Convert (and flatten) src into dst; progress(percent) is called as it goes."""
    argv = ["qemu-img", "convert", "-f", src_fmt, "-O", dst_fmt, src, dst]
    if progress is None:
        run(argv)
        return
    buf = ""

    def on_chunk(text):
        nonlocal buf
        buf = (buf + text)[-64:]
        found = _PROGRESS.findall(buf)
        if found:
            progress(float(found[-1]))

    stream(argv[:2] + ["-p"] + argv[2:], on_chunk)


def create_layer(path, backing, size=None):
    """A new empty qcow2 layer on top of backing (a path relative to path's directory)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, path]
    if size is not None:
        argv.append(str(size))
    run(argv)


def create(path, size, fmt="qcow2"):
    """A new empty standalone image of size bytes."""
    run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)])


def rebase_unsafe(path, backing):
    """Point a qcow2 layer at another backing file of the same content (its header only)."""
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, path])


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise UsageError(f"invalid size '{text}'", "Give a size like 20G, 512M or a number of bytes.")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m[2].upper()]
    return int(float(m[1]) * unit)
