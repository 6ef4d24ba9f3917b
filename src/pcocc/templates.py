"""VM templates: their settings, inheritance and resolution.

A template names an image, a resource set and qemu tuning. User templates
(~/.pcocc) may inherit system templates (/etc/pcocc), never the reverse.
Resolution walks the `inherits` chain and remembers where each value came from.
"""

from dataclasses import dataclass, field

from pcocc.config.schema import Anything, Bool, ByKind, Const, Enum, F, Int, ListOf, MapOf, Nullable, OneKeyMap, Str, Struct
from pcocc.errors import NotFoundError

_CACHE_MODES = ("writeback", "none", "unsafe", "writethrough", "directsync")


def _drive(value):
    """A persistent drive, as a path or {path: {options}}, in one form.

    Its format is never probed from its content (a guest could write a qcow2 header
    into a raw drive and make qemu open a host file): raw, unless named *.qcow2 or given.
    """
    if isinstance(value, str):
        value = {value: {"cache": "writeback", "mmp": True, "backup": None, "format": None}}
    ((path, opts),) = value.items()
    fmt = opts.get("format") or ("qcow2" if path.endswith(".qcow2") else "raw")
    return {"path": path, **opts, "format": fmt}


_DRIVE_OPTS = Struct(
    {
        "cache": F(Enum(*_CACHE_MODES), default="writeback"),
        "mmp": F(ByKind({bool: Bool(), str: Enum("cluster", "yes", "no")}, "true, false or 'cluster'"), default=True),
        "backup": F(Str()),
        "format": F(Enum("raw", "qcow2")),  # ours: default raw, or qcow2 for *.qcow2
    }
)


def _mount(value):
    return {"path": value, "readonly": False, "type": "virtio-9p"} if isinstance(value, str) else value


_MOUNT = ByKind(
    {
        str: Str(),
        dict: Struct(
            {
                "path": F(Str(), required=True),
                "readonly": F(Bool(), default=False),
                "type": F(Enum("virtio-9p", "virtio-fs"), default="virtio-9p"),
            }
        ),
    },
    "a path or a mapping with 'path'",
    convert=_mount,
)


@dataclass(frozen=True)
class Setting:
    kind: object
    default: object = None
    inheritable: bool = True
    help: str = ""


SETTINGS = {
    "image": Setting(ByKind({str: Str(), bool: Const(False)}, "an image URI [REPO:]NAME[@REV]"), help="image URI [REPO:]NAME[@REV]"),
    "resource-set": Setting(Str(), help="resource set from resources.yaml"),
    "inherits": Setting(Str(), help="parent template"),
    "description": Setting(Str(), "", inheritable=False, help="a line shown by 'template list'"),
    "user-data": Setting(ByKind({str: Str(), dict: Anything()}, "a file path or a cloud-config mapping"), help="cloud-init user-data"),
    "instance-id": Setting(Str(), help="cloud-init instance-id"),
    "mount-points": Setting(MapOf(_MOUNT, key=Str(r"[a-zA-Z0-9_.-]{1,31}", "a mount tag")), {}, help="host directories shared with the VM"),
    "persistent-drives": Setting(
        ListOf(ByKind({str: Str(), dict: OneKeyMap(_DRIVE_OPTS)}, "a path or {path: {options}}", convert=_drive)), [], help="drives used in place"
    ),
    "remote-display": Setting(Enum("spice"), help="remote display protocol"),
    "custom-args": Setting(ListOf(Str()), [], help="extra qemu arguments"),
    "qemu-bin": Setting(Str(), "qemu-system-x86_64", help="qemu binary"),
    "nic-model": Setting(Str(), "virtio-net", help="qemu NIC model"),
    "machine-type": Setting(Str(), "pc", help="qemu machine type"),
    "cpu-model": Setting(Str(), help="qemu CPU model (default: the host's, where the accelerator allows)"),
    "disk-model": Setting(Enum("virtio", "virtio-scsi", "ide"), "virtio", help="disk controller"),
    "disk-cache": Setting(Enum(*_CACHE_MODES), "unsafe", help="cache mode of the ephemeral disk"),
    "emulator-cores": Setting(Int(min=0), 0, help="cores kept for qemu's own threads"),
    "bind-vcpus": Setting(Bool(), True, help="pin vCPUs to the allocated cores"),
    "full-node": Setting(Bool(), False, help="the VM may use every core of the node"),
    "kernel": Setting(Str(), help="kernel to boot directly"),
    "initrd": Setting(Str(), help="initrd for 'kernel' (ours)"),
    "append": Setting(Str(), help="kernel command line for 'kernel' (ours)"),
}

# A key written with no value (`custom-args:`) is kept as None: "the default, whatever the parent
# says" (the original's rule, pcocc-templates.yaml(5) and its template resolution).
SCHEMA = Struct({name: F(Nullable(s.kind)) for name, s in SETTINGS.items()}, "template (a mapping of settings)")


@dataclass
class Template:
    """A template as written in one file: only the keys it sets itself.

    values: {key: value} of the keys written; a key written with no value is
    there with None, which resets an inherited value to the key's default.
    """

    name: str
    scope: str  # "system" or "user"
    file: str
    line: int
    values: dict
    key_lines: dict = field(default_factory=dict)

    @property
    def parent(self):
        return self.values.get("inherits")

    def where(self, key=None):
        return f"{self.file}:{self.key_lines.get(key, self.line)}"


@dataclass(frozen=True)
class Resolved:
    """A template with inheritance applied; origin[key] names the template a value came from."""

    name: str
    scope: str
    values: dict
    origin: dict

    def __getitem__(self, key):
        return self.values[key]

    def inherited(self, key):
        return self.origin.get(key) not in (None, self.name)


class TemplateSet:
    def __init__(self, templates, default_resource_set=None):
        self.templates = templates  # name -> Template
        self.default_resource_set = default_resource_set

    def __contains__(self, name):
        return name in self.templates

    def names(self):
        return sorted(self.templates)

    def get(self, name):
        try:
            return self.templates[name]
        except KeyError:
            raise NotFoundError(f"no template named '{name}'", "See 'pcocc template list'.") from None

    def chain(self, name):
        """The template and its ancestors, nearest first (the loader rejected cycles)."""
        out, seen = [], set()
        tpl = self.get(name)
        while tpl is not None and tpl.name not in seen:
            seen.add(tpl.name)
            out.append(tpl)
            tpl = self.templates.get(tpl.parent) if tpl.parent else None
        return out

    def resolve(self, name):
        """The template with inheritance applied (a Resolved).

        The nearest template of the chain that writes a key gives its value; one
        that writes it with no value gives the key's default (as the original
        pcocc does: an empty key is not "inherit"). No resource-set anywhere:
        the default resource set, if any. Raises NotFoundError for an unknown name.
        """
        chain = self.chain(name)
        values, origin = {}, {}
        for key, setting in SETTINGS.items():
            values[key], origin[key] = setting.default, None
            for tpl in chain if setting.inheritable else chain[:1]:
                if key in tpl.values:
                    value = tpl.values[key]
                    values[key], origin[key] = (setting.default if value is None else value), tpl.name
                    break
        if values["resource-set"] is None and self.default_resource_set:
            values["resource-set"], origin["resource-set"] = self.default_resource_set, None
        values["inherits"], origin["inherits"] = chain[0].parent, chain[0].name if chain[0].parent else None
        return Resolved(name, chain[0].scope, values, origin)
