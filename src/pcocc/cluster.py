"""Cluster definitions: 'tpl1:2,tpl2:1' -> VMs vm0..vmN-1 with their templates."""

import re
from dataclasses import dataclass

from pcocc.errors import UsageError
from pcocc.names import shown

_PART = re.compile(r"([a-zA-Z0-9][a-zA-Z0-9_.-]*)(?::([0-9]+))?", re.ASCII)
_VMSET = re.compile(r"vm(?:([0-9]+)|\[([0-9,\-]+)\])|(\S)", re.ASCII)
MAX_VMS = 4096  # VMs of one cluster (documented in 'pcocc batch --help')
MAX_DEFINITION = 4096  # characters of a cluster definition or of a VM list
_HOW = "Write TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], e.g. tiny:3."
_HOW_VMS = "Write vm0, vm[0-3,5] or all."


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


def parse_vmset(text, count):
    """Ranks named by 'vm0', 'vm[0-3,5]', 'all' or '-' within a cluster of count VMs.

    Sorted, each once. Ranges are checked against count before they are
    expanded. Raises UsageError.
    """
    if text in ("all", "-"):
        return list(range(count))
    if not isinstance(text, str) or len(text) > MAX_DEFINITION:
        raise UsageError(f"invalid VM list {shown(text)}", _HOW_VMS)
    ranks = set()

    def rank(digits):
        if len(digits.lstrip("0")) > len(str(max(count, 1))) or int(digits) >= count:
            raise UsageError(f"no VM vm{digits.lstrip('0') or '0'} in this cluster "
                             + (f"(it has vm0 to vm{count - 1})" if count else "(it has no VM)"))
        return int(digits)

    for m in _VMSET.finditer(text.replace(",vm", " vm")):
        if m[3]:
            if m[3] in ", ":
                continue
            raise UsageError(f"invalid VM list {shown(text)}", _HOW_VMS)
        if m[1]:
            ranks.add(rank(m[1]))
        else:
            for piece in m[2].split(","):
                lo, _, hi = piece.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()) or "-" in hi:
                    raise UsageError(f"invalid VM list {shown(text)}", _HOW_VMS)
                first, last = rank(lo), rank(hi or lo)
                if last < first:
                    raise UsageError(f"invalid VM list {shown(text)}: vm{first} comes after vm{last}", _HOW_VMS)
                ranks.update(range(first, last + 1))
    if not ranks:
        raise UsageError(f"invalid VM list {shown(text)}", _HOW_VMS)
    return sorted(ranks)
