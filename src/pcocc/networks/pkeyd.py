"""pkeyd: keep OpenSM's partitions file in step with the PKeys of running virtual clusters.

Runs as root on the subnet manager's node (`pcocc internal pkeyd`, a systemd
unit in contrib/systemd). For each partitions file an infiniband network names
(opensm-partition-cfg), it writes the site's static partitions (the template,
opensm-partition-tpl, copied as it is) followed by one partition per allocated
PKey: the clusters' VFs as full members with the PKey at index 0 of their table
(indx0: their default PKey), and the ports of the hosts that carry them, full
members too (the physical port must hold the PKey for its VFs to use it).
Then SIGHUP makes OpenSM re-read it. The file is replaced atomically and only
when its text changes; a start always writes it, so a restart catches up.
"""

import logging
import os
import signal
import time

from pcocc import state
from pcocc.allocator import Pool
from pcocc.errors import PcoccError
from pcocc.networks import sysfs
from pcocc.networks.infiniband import PKEY_POOL

log = logging.getLogger("pcocc.pkeyd")

GUIDS_PER_LINE = 100  # OpenSM reads lines of up to 4096 characters; "0x<16 hex>=full, " takes 25
RESCAN = 60  # seconds: re-render even without a store change (an edited template)
MARK = "# pcocc pkeyd: the partitions of virtual clusters (generated: edit the template, not this)"


def targets(config):
    """{(cfg, tpl, daemon): {network names}} of the configured infiniband networks."""
    out = {}
    for net in config.networks.values():
        if net.type == "infiniband":
            s = net.settings
            out.setdefault((s["opensm-partition-cfg"], s["opensm-partition-tpl"], s["opensm-daemon"]), set()).add(net.name)
    return out


def partitions(store):
    """{pkey: {network, vf_guids, host_guids}} of the PKeys allocated in the store.

    A node's members count only while their cluster still owns the PKey: a stale
    entry (a node that crashed) never joins the partition of the next owner.
    """
    owners = Pool(store, PKEY_POOL, 0, 0).owners()
    prefix = state.pkey_members_prefix()
    out = {}
    for key, member in store.range(prefix).items():
        try:
            pkey = int(key[len(prefix):].split("/")[0], 16)
        except ValueError:
            log.warning("ignoring %s: not a PKey", key)
            continue
        if not isinstance(member, dict) or owners.get(pkey) != member.get("owner"):
            continue
        part = out.setdefault(pkey, {"network": member.get("network"), "vf_guids": [], "host_guids": []})
        part["vf_guids"] += member.get("vf_guids", [])
        part["host_guids"] += [g for g in member.get("host_guids", []) if g not in part["host_guids"]]
    return out


def render(template, parts):
    """The partitions file: the template, then a partition per PKey (several lines when long)."""
    lines = [template.rstrip("\n"), "", MARK]
    for pkey in sorted(parts):
        name = f"pcocc_0x{pkey:04x}=0x{pkey:04x}"
        for chunk in _chunks(sorted(parts[pkey]["vf_guids"])):
            lines.append(f"{name}, indx0, ipoib : {', '.join(g + '=full' for g in chunk)} ;")
        for chunk in _chunks(sorted(parts[pkey]["host_guids"])):
            lines.append(f"{name}, ipoib : {', '.join(g + '=full' for g in chunk)} ;")
    return "\n".join(lines) + "\n"


def _chunks(items):
    return [items[i:i + GUIDS_PER_LINE] for i in range(0, len(items), GUIDS_PER_LINE)]


def write_atomic(fs, path, text):
    """Replace path by text at once (OpenSM never reads half a file)."""
    target = fs.path(path)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.pkeyd.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def opensm_pids(fs, daemon):
    """The pids to signal: from a pidfile (an absolute path, under the host root), else every
    process of that name (its comm, or its argv[0]'s base name)."""
    if daemon.startswith("/"):
        text = fs.read(daemon)
        return [int(text)] if text and text.isdigit() else []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if comm == daemon[:15] or os.path.basename(argv0) == daemon:  # the kernel cuts comm at 15 characters
            pids.append(int(entry))
    return pids


def signal_opensm(fs, daemon):
    pids = opensm_pids(fs, daemon)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pass
    if not pids:
        log.warning("no %s process to signal: OpenSM will read the partitions when it starts", daemon)
    return pids


def refresh(store, config, fs, last):
    """Rewrite each partitions file whose text changed (last: {cfg: text}, updated) and signal OpenSM."""
    parts = partitions(store)
    for (cfg, tpl, daemon), nets in sorted(targets(config).items()):
        template = fs.read(tpl)
        if template is None:
            raise PcoccError(f"no partitions template {fs.path(tpl)} (opensm-partition-tpl): copy the site's partitions.conf there")
        text = render(template, {p: v for p, v in parts.items() if v["network"] in nets})
        if last.get(cfg) != text:
            write_atomic(fs, cfg, text)
            last[cfg] = text
            log.info("%s: %d partition(s) of virtual clusters; signalled %s %s", cfg,
                     sum(v["network"] in nets for v in parts.values()), daemon, signal_opensm(fs, daemon))


def serve(store, config, environ, stop, once=False):
    """Refresh until stop (a threading.Event) is set; once: a single refresh, errors raised."""
    if not targets(config):
        raise PcoccError("no infiniband network in networks.yaml: pkeyd has nothing to manage")
    fs = sysfs.open_host(environ)
    last = {}
    watched = (state.pool_key(PKEY_POOL), state.pkey_members_prefix())
    while True:
        seen = {k: v for k, v in store.range("/pcocc/global/").items() if k.startswith(watched)}
        try:
            refresh(store, config, fs, last)
        except (PcoccError, OSError) as exc:
            if once:
                raise
            log.error("%s", getattr(exc, "message", None) or exc)
        if once:
            return
        deadline = time.monotonic() + RESCAN
        while not stop.is_set() and time.monotonic() < deadline:
            changed = store.wait("/pcocc/global/", lambda items: {k: v for k, v in items.items() if k.startswith(watched)} != seen, 1.0)
            if changed is not None:
                break
        if stop.is_set():
            return
