"""Cluster definitions: 'tpl1:2,tpl2:1' -> VMs vm0..vmN-1 with their templates."""

import re
from dataclasses import dataclass

from pcocc.errors import UsageError
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
