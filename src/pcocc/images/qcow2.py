"""Just enough of the qcow2 format to create empty overlays without a process.

A per-VM ephemeral disk is an empty qcow2 file whose backing file is the
image's top layer. Writing those few clusters ourselves takes microseconds,
whatever the image size, where `qemu-img create` costs a process each.
"""

import math
import os
import struct

MAGIC = b"QFI\xfb"
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
_EXT_BACKING_FORMAT = 0xE2792ACA
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # version 3 header, 104 bytes


def _pad8(data):
    return data + b"\0" * (-len(data) % 8)


def create_overlay(path, backing, virtual_size, backing_format="qcow2"):
    """Write an empty qcow2 v3 image at path on top of backing (stored as given)."""
    l2_entries = CLUSTER // 8
    l1_size = max(1, math.ceil(virtual_size / (l2_entries * CLUSTER)))
    l1_clusters = math.ceil(l1_size * 8 / CLUSTER)
    # clusters: 0 header, 1 refcount table, 2 refcount block, 3.. L1 table
    refcount_table, refcount_block, l1_offset = CLUSTER, 2 * CLUSTER, 3 * CLUSTER
    n_clusters = 3 + l1_clusters
    ext = struct.pack(">II", _EXT_BACKING_FORMAT, len(backing_format)) + _pad8(backing_format.encode())
    ext += struct.pack(">II", 0, 0)  # end of extensions
    backing_bytes = backing.encode()
    backing_offset = _HEADER.size + len(ext)
    if backing_offset + len(backing_bytes) > CLUSTER:
        raise ValueError("backing file name too long")
    header = _HEADER.pack(
        MAGIC, 3, backing_offset, len(backing_bytes), CLUSTER_BITS, virtual_size, 0,
        l1_size, l1_offset, refcount_table, 1, 0, 0,
        0, 0, 0, 4, _HEADER.size,  # features, refcount_order=4 (16 bits), header length
    )
    cluster0 = header + ext + backing_bytes
    refcounts = struct.pack(f">{n_clusters}H", *([1] * n_clusters))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(cluster0.ljust(CLUSTER, b"\0"))
        f.write(struct.pack(">Q", refcount_block).ljust(CLUSTER, b"\0"))
        f.write(refcounts.ljust(CLUSTER, b"\0"))
        f.truncate(n_clusters * CLUSTER)  # the L1 table: zeros, all unallocated
    os.rename(tmp, path)


def read_header(path):
    """(virtual size, backing file name or None) of a qcow2 file."""
    with open(path, "rb") as f:
        head = f.read(CLUSTER)
    if head[:4] != MAGIC:
        raise ValueError(f"{path}: not a qcow2 file")
    version, backing_offset, backing_size = struct.unpack(">IQI", head[4:20])
    size = struct.unpack(">Q", head[24:32])[0]
    backing = head[backing_offset : backing_offset + backing_size].decode() if backing_offset else None
    return size, backing
