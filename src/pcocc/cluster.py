"""Cluster definitions: 'tpl1:2,tpl2:1' -> VMs vm0..vmN-1 with their templates."""

import re
from dataclasses import dataclass

from pcocc.errors import NotFoundError, UsageError
from pcocc.names import shown

_PART = re.compile(r"([a-zA-Z0-9][a-zA-Z0-9_.-]*)(?::([0-9]+))?", re.ASCII)
_VMNAME = re.compile(r"vm([0-9]+)", re.ASCII)
MAX_VMS = 4096  # VMs of one cluster (documented in 'pcocc batch --help')
MAX_DEFINITION = 4096  # characters of a cluster definition or of a VM list
_HOW = "Write TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], e.g. tiny:3."
_HOW_VMS = "Write vm0, vm[0-3,5], vm[0-7]!vm3 (clush's node sets) or all."


@dataclass(frozen=True)
class VMSpec:
    rank: int
    template: str

    @property
    def name(self):
        return f"vm{self.rank}"


def _count(digits, text):
    """The int of a VM count's ASCII digits, bounded by MAX_VMS before any conversion."""
    if len(digits.lstrip("0")) > len(str(MAX_VMS)) or int(digits) > MAX_VMS:
        raise UsageError(f"invalid cluster definition {shown(text)}: more than {MAX_VMS} VMs")
    return int(digits)


def parse_definition(text, templates):
    """The VMs of a definition, ranks in order; templates is a TemplateSet.

    text: 'TEMPLATE[:COUNT][,...]', ASCII digits only, at most MAX_VMS VMs in
    all (checked before any VM is made). Raises UsageError (bad syntax, too
    many VMs), NotFoundError (unknown template).
    """
    if not isinstance(text, str) or len(text) > MAX_DEFINITION:
        raise UsageError(f"invalid cluster definition {shown(text)}: longer than {MAX_DEFINITION} characters", _HOW)
    parts = []
    total = 0
    for part in text.split(","):
        m = _PART.fullmatch(part.strip())
        if not m:
            raise UsageError(f"invalid cluster definition {shown(text)}", _HOW)
        name, count = m[1], _count(m[2], text) if m[2] is not None else 1
        if count < 1:
            raise UsageError(f"invalid cluster definition {shown(text)}: {name} needs at least one VM")
        total += count
        if total > MAX_VMS:
            raise UsageError(f"invalid cluster definition {shown(text)}: more than {MAX_VMS} VMs")
        parts.append((name, count))
    for name, _ in parts:
        templates.get(name)  # NotFoundError names the template
    vms = []
    for name, count in parts:
        vms += [VMSpec(len(vms) + i, name) for i in range(count)]
    return vms


def parse_vmset(text, count, exclude=None):
    """Ranks named by a node set within a cluster of count VMs: sorted, each once.

    text: 'all' or '-' (every VM), or a node set in clush's syntax, read by ClusterShell's
    NodeSet (clush(1), nodeset(1)): vm0, vm[0-3,5], vm0,vm2, vm[0-7]!vm3 (minus),
    vm[0-7]&vm[4-9] (and), vm[0-3]^vm[2-5] (xor). exclude: another node set to leave out
    (clush's -x). Every name must be vmN with ASCII digits (vm001 is vm1), and every number
    written must name a VM of the cluster: that is checked on the text, before any range is
    expanded. Raises UsageError (bad syntax, no such VM, nothing left).
    """
    ranks = _vmset(text, count, allow_all=True)
    if exclude:
        ranks -= _vmset(exclude, count, allow_all=False)
        if not ranks:
            raise UsageError(f"no VM left in {shown(text)} once {shown(exclude)} is excluded", _HOW_VMS)
    return sorted(ranks)


def _vmset(text, count, allow_all):
    if allow_all and text in ("all", "-"):
        return set(range(count))
    if not isinstance(text, str) or not text or len(text) > MAX_DEFINITION or not text.isascii():
        raise UsageError(f"invalid VM list {shown(text)}", _HOW_VMS)
    for digits in re.findall(r"[0-9]+", text):  # bounds first: vm[0-99999999999] is never expanded
        if len(digits.lstrip("0")) > len(str(max(count, 1))) or int(digits) >= count:
            raise UsageError(f"no VM vm{digits.lstrip('0') or '0'} in this cluster "
                             + (f"(it has vm0 to vm{count - 1})" if count else "(it has no VM)"))
    from ClusterShell.NodeSet import NodeSet, NodeSetException  # lazily: pcocc --help stays fast

    try:
        names = list(NodeSet(text))
    except (NodeSetException, ValueError, TypeError) as exc:
        raise UsageError(f"invalid VM list {shown(text)}: {exc}", _HOW_VMS) from None
    ranks = set()
    for name in names:
        m = _VMNAME.fullmatch(name)
        if not m:
            raise UsageError(f"invalid VM list {shown(text)}: {shown(name)} is not a VM name", _HOW_VMS)
        ranks.add(int(m[1]))
    if not ranks:
        raise UsageError(f"invalid VM list {shown(text)}", _HOW_VMS)
    return ranks


# ---- the VMs of a cluster's record (Backend.cluster_info), whatever pcocc wrote it -------------
#
# The record names each template's settings once, {"templates": {name: settings}}, and which
# template each rank runs as runs of consecutive ranks, {"layout": [[name, count], ...]} in
# rank order: its size grows with the number of templates, not of VMs (a 16,000-VM cluster's
# record is a few KiB, far below etcd's request limit). A record written by an older pcocc
# has instead {"vms": [{"rank", "template", "settings", ...}]}, one entry per VM; a record of
# the new shape may also carry per-VM placement ({"placement": {"cores": [[core] per rank],
# "memory_mb": MiB, "pin": bool}}, the local backend's). Read them only through the functions
# below, which take both shapes.


def record_vms(vms, resolved):
    """The VM fields of a new cluster record: {"templates": {name: settings}, "layout":
    [[name, count], ...]} (runs of consecutive ranks of one template, in rank order).

    vms: [VMSpec] ranked 0..N-1 in order; resolved: {template name: Resolved}. Raises
    ValueError when the ranks are not 0..N-1 in order."""
    layout = []
    for i, vm in enumerate(vms):
        if vm.rank != i:
            raise ValueError(f"VM ranks must be 0..{len(vms) - 1} in order, not {vm.rank} at {i}")
        if layout and layout[-1][0] == vm.template:
            layout[-1][1] += 1
        else:
            layout.append([vm.template, 1])
    return {"templates": {name: resolved[name].values for name, _ in layout}, "layout": layout}


def settings_runs(info):
    """[(template, settings, first rank, count)] of a cluster record, in rank order: each run
    of consecutive VMs with one template and its settings (one run per template and part of
    the definition; an older record's VMs are compared one by one). settings: a dict the
    caller must not change."""
    if "layout" in info:
        out, first = [], 0
        for name, count in info["layout"]:
            out.append((name, info["templates"][name], first, count))
            first += count
        return out
    out = []
    for rank, vm in enumerate(info.get("vms") or []):  # an older record: one entry per VM
        template, settings = vm.get("template"), vm.get("settings") or {}
        if out and out[-1][0] == template and out[-1][1] == settings:
            out[-1] = (template, out[-1][1], out[-1][2], out[-1][3] + 1)
        else:
            out.append((template, settings, rank, 1))
    return out


def vm_count(info):
    """How many VMs a cluster record has (0 for a placeholder without VMs)."""
    if "layout" in info:
        return sum(count for _, count in info["layout"])
    return len(info.get("vms") or [])


def vm_template(info, rank):
    """The template name of VM `rank`; NotFoundError when the record has no such rank."""
    if "layout" in info:
        first = 0
        for name, count in info["layout"]:
            if rank < first + count:
                if rank >= 0:
                    return name
                break
            first += count
    else:
        vms = info.get("vms") or []
        if 0 <= rank < len(vms):
            return vms[rank].get("template")
    raise NotFoundError(f"VM rank {rank} is not in the cluster's record ({vm_count(info)} VMs)")


def vm_settings(info, rank):
    """The template settings of VM `rank` (a dict the caller must not change); NotFoundError
    when the record has no such rank."""
    template = vm_template(info, rank)
    if "templates" in info:
        return info["templates"][template]
    return info["vms"][rank].get("settings") or {}


def vm_spec(info, rank):
    """What the record says of VM `rank`: {"rank", "template", "settings"}, plus its placement
    when the record has one ("cores": [core], "memory_mb": MiB, "pin": bool; the local
    backend's; absent under SLURM, where the task's slice decides). NotFoundError when the
    record has no such rank."""
    spec = {"rank": rank, "template": vm_template(info, rank), "settings": vm_settings(info, rank)}
    vms = info.get("vms") or []
    if rank < len(vms):  # an older record, or a per-VM list next to the layout
        spec.update({k: v for k, v in vms[rank].items() if k in ("cores", "memory_mb", "pin")})
    placement = info.get("placement")
    if placement:
        spec.update(cores=placement["cores"][rank], memory_mb=placement["memory_mb"], pin=placement.get("pin", True))
    return spec

