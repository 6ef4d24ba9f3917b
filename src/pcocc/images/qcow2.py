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


_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2_COMPRESSED = 1 << 62
_INCOMPAT_EXTERNAL_DATA, _INCOMPAT_EXTENDED_L2 = 1 << 2, 1 << 4


def read_guest(path, offset, length, _depth=0):
    """length bytes of the guest's disk at offset, read through a qcow2 file and its backing chain.

    offset and length in bytes; the range must lie within one cluster (64 KiB by
    default: a boot sector always does). Backing files are found as qemu finds
    them (relative to the directory of the file that names them); a non-qcow2
    backing file is read as raw. Returns None where this reader cannot tell
    (compressed or encrypted clusters, external data files, extended L2 entries,
    a chain deeper than 64). Raises ValueError if path is not a qcow2 file,
    OSError if a file of the chain cannot be read. Format: docs/interop/qcow2.txt
    of qemu.
    """
    if _depth > 64:
        return None
    with open(path, "rb") as f:
        head = f.read(CLUSTER)
        if head[:4] != MAGIC:
            if _depth == 0:
                raise ValueError(f"{path}: not a qcow2 file")
            f.seek(offset)
            return f.read(length).ljust(length, b"\0")  # a raw backing file
        version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset = struct.unpack(">IQIIQIIQ", head[4:48])
        incompat = struct.unpack(">Q", head[72:80])[0] if version >= 3 else 0
        cluster = 1 << cluster_bits
        if crypt or incompat & (_INCOMPAT_EXTERNAL_DATA | _INCOMPAT_EXTENDED_L2) or offset // cluster != (offset + length - 1) // cluster:
            return None
        if offset >= size:
            return b"\0" * length
        l2_entries = cluster // 8
        l1_index, l2_index = offset // (cluster * l2_entries), (offset // cluster) % l2_entries
        data = None
        if l1_index < l1_size:
            f.seek(l1_offset + 8 * l1_index)
            l2_table = struct.unpack(">Q", f.read(8))[0] & _OFFSET_MASK
            if l2_table:
                f.seek(l2_table + 8 * l2_index)
                entry = struct.unpack(">Q", f.read(8))[0]
                if entry & _L2_COMPRESSED:
                    return None
                if version >= 3 and entry & 1:
                    return b"\0" * length  # an all-zero cluster
                if entry & _OFFSET_MASK:
                    f.seek((entry & _OFFSET_MASK) + offset % cluster)
                    data = f.read(length).ljust(length, b"\0")
        if data is not None:
            return data
        if not backing_offset:
            return b"\0" * length
        backing = head[backing_offset : backing_offset + backing_size].decode()
    backing = os.path.join(os.path.dirname(path), backing)  # an absolute name stays as it is
    return read_guest(backing, offset, length, _depth + 1)


def has_boot_code(path):
    """True if the guest disk starts with a BIOS boot sector (0x55AA and some code), False if not, None if unknown.

    A disk without one (a bare file system, or a partition table with empty
    code, as the images pcocc builds) boots only from a kernel given beside it.
    """
    sector = read_guest(path, 0, 512)
    if sector is None:
        return None
    return sector[510:512] == b"\x55\xaa" and any(sector[:440])
