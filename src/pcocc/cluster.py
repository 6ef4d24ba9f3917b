"""Cluster definitions: 'tpl1:2,tpl2:1' -> VMs vm0..vmN-1 with their templates."""

import re
from dataclasses import dataclass

from pcocc.errors import UsageError

_PART = re.compile(r"([a-zA-Z0-9][a-zA-Z0-9_.-]*)(?::(\d+))?")
MAX_VMS = 4096


@dataclass(frozen=True)
class VMSpec:
    rank: int
    template: str

    @property
    def name(self):
        return f"vm{self.rank}"


def parse_definition(text, templates):
    """The VMs of a definition, ranks in order; templates is a TemplateSet."""
    vms = []
    for part in text.split(","):
        m = _PART.fullmatch(part.strip())
        if not m:
            raise UsageError(f"invalid cluster definition '{text}'", "Write TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], e.g. tiny:3.")
        name, count = m[1], int(m[2] or 1)
        if count < 1:
            raise UsageError(f"invalid cluster definition '{text}': {name} needs at least one VM")
        templates.get(name)  # NotFoundError names the template
        vms += [VMSpec(len(vms) + i, name) for i in range(count)]
        if len(vms) > MAX_VMS:
            raise UsageError(f"invalid cluster definition '{text}': more than {MAX_VMS} VMs")
    return vms


def parse_vmset(text, count):
    """Ranks named by 'vm0', 'vm[0-3,5]', 'all' or '-' within a cluster of count VMs."""
    if text in ("all", "-"):
        return list(range(count))
    ranks = []
    for m in re.finditer(r"vm(?:(\d+)|\[([0-9,\-]+)\])|(\S)", text.replace(",vm", " vm")):
        if m[3]:
            if m[3] in ", ":
                continue
            raise UsageError(f"invalid VM list '{text}'", "Write vm0, vm[0-3,5] or all.")
        if m[1]:
            ranks.append(int(m[1]))
        else:
            for piece in m[2].split(","):
                lo, _, hi = piece.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()):
                    raise UsageError(f"invalid VM list '{text}'", "Write vm0, vm[0-3,5] or all.")
                ranks += range(int(lo), int(hi or lo) + 1)
    if not ranks:
        raise UsageError(f"invalid VM list '{text}'", "Write vm0, vm[0-3,5] or all.")
    bad = [r for r in ranks if r >= count]
    if bad:
        raise UsageError(f"no VM vm{bad[0]} in this cluster (it has vm0 to vm{count - 1})")
    return sorted(set(ranks))
