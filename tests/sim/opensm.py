"""A SIMULATED OpenSM: reads its partitions file at start and on each SIGHUP, and records it.

    python opensm.py NAME PARTITIONS RECORD_DIR PIDFILE

Takes NAME as its process name (comm, like the real daemon's "opensm"), writes
its pid to PIDFILE once ready, then for each read appends to RECORD_DIR/reads.jsonl
one line: {"n": read number, "text": the file, "partitions": {pkey: {"flags",
"members"}}, "error": a parse error or null}. The parse follows OpenSM's
partitions.conf grammar as far as pkeyd uses it: `Name=PKey[,flag]... : GUID[=full|limited], ... ;`
statements, '#' comments, one partition split over several statements when its
PKey repeats. SIGTERM ends it.
"""

import ctypes
import json
import os
import re
import signal
import sys


def set_name(name):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME: what /proc/<pid>/comm shows


def parse(text):
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    parts = {}
    for stmt in filter(None, (s.strip() for s in body.split(";"))):
        head, sep, members = stmt.partition(":")
        if not sep:
            raise ValueError(f"no ':' in {stmt!r}")
        fields = [f.strip() for f in head.split(",")]
        m = re.fullmatch(r"([\w.-]*)=(0x[0-9a-fA-F]{1,4})", fields[0])
        if not m:
            raise ValueError(f"bad partition definition {fields[0]!r}")
        pkey = f"0x{int(m.group(2), 16) & 0x7FFF:04x}"
        part = parts.setdefault(pkey, {"flags": set(), "members": {}})
        part["flags"].update(fields[1:])
        for spec in filter(None, (s.strip() for s in members.split(","))):
            guid, _, kind = spec.partition("=")
            if guid not in ("ALL", "SELF", "ALL_CAS", "ALL_SWITCHES", "ALL_ROUTERS") and not re.fullmatch(r"0x[0-9a-f]{16}", guid):
                raise ValueError(f"bad port GUID {guid!r}")
            part["members"][guid] = kind or "limited"
    return {k: {"flags": sorted(v["flags"]), "members": v["members"]} for k, v in parts.items()}


def main(name, partitions, record_dir, pidfile):
    set_name(name)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM})
    reads = 0

    def read():
        nonlocal reads
        reads += 1
        try:
            with open(partitions) as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        entry = {"n": reads, "text": text, "partitions": None, "error": None}
        try:
            entry["partitions"] = parse(text) if text is not None else {}
        except ValueError as exc:
            entry["error"] = str(exc)
        with open(os.path.join(record_dir, "reads.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    read()
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, pidfile)
    while signal.sigwait({signal.SIGHUP, signal.SIGTERM}) == signal.SIGHUP:
        read()


if __name__ == "__main__":
    main(*sys.argv[1:5])
