"""Names of host devices and guest MAC addresses, computed the same way on both sides.

Node setup (root) creates the devices and the VM process (the user) opens them:
neither asks the other, so every name derives from the job id, the VM rank and
the network's settings only.
"""

import hashlib

IFNAMSIZ = 15  # longest Linux interface name


def dev_name(prefix, kind, *parts):
    """prefix + kind + the parts joined by '_', or a short hash of them when that is too long.

    e.g. dev_name("pn", "t", 12, 3) == "pnt12_3"; a prefix has at most 8 characters,
    which leaves 6 for the hash (36**6 names: a clash on one node is very unlikely,
    and fails the creation loudly rather than sharing a device).
    """
    plain = prefix + kind + "_".join(str(p) for p in parts)
    if len(plain) <= IFNAMSIZ:
        return plain
    room = IFNAMSIZ - len(prefix) - len(kind)
    digest = int.from_bytes(hashlib.sha1("_".join(map(str, parts)).encode()).digest()[:8], "big")
    return prefix + kind + _base36(digest)[:room]


def _base36(n):
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def mac_address(prefix, rank, offset=0):
    """Upstream's scheme: the prefix octets, then rank + offset in the remaining octets.

    mac_address("52:54:00", 3) == "52:54:00:00:00:03"
    """
    octets = [int(o, 16) for o in prefix.split(":")]
    room = 6 - len(octets)
    value = rank + offset
    if room <= 0 or value >= 256 ** room:
        raise ValueError(f"VM rank {rank} (+ offset {offset}) does not fit in a MAC address after the prefix {prefix}")
    octets += list(value.to_bytes(room, "big"))
    return ":".join(f"{o:02x}" for o in octets)
