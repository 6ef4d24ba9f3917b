"""VM templates: their settings, inheritance and resolution.

A template names an image, a resource set and qemu tuning. User templates
(~/.pcocc) may inherit system templates (/etc/pcocc), never the reverse.
Resolution walks the `inherits` chain and remembers where each value came from.

Per-image templates (the original pcocc's rule): when resources.yaml marks a
resource set as the default, every VM image of the repositories is also a
template of the same name, `image: REPO:NAME` (the first repository, in search
order, that holds it) and nothing else, unless a template of that name is
written in a file (which wins). `pcocc image import disk.qcow2 user:centos`
then `pcocc alloc centos:3` works with no templates.yaml. Such a template is
looked up only when a name is not a written template (one image's metadata
read per repository), never listed unless asked (names(images=True)).
"""

import contextlib
import re
from dataclasses import dataclass, field

from pcocc.config.schema import Anything, Bool, ByKind, Const, Enum, F, Int, ListOf, MapOf, Nullable, OneKeyMap, Str, Struct
from pcocc.errors import NotFoundError, PcoccError
from pcocc.fsutil import not_a_dir

_TEMPLATE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")  # as the config loader and cluster definitions accept
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


MOUNT_TYPES = ("virtio-9p", "virtio-fs")
MOUNT_TAG = r"[a-zA-Z0-9_.-]{1,31}"  # a mount tag, in templates and in alloc/batch --mount


def _mount(value):
    return {"path": value, "readonly": False, "type": "virtio-9p"} if isinstance(value, str) else value


_MOUNT = ByKind(
    {
        str: Str(),
        dict: Struct(
            {
                "path": F(Str(), required=True),
                "readonly": F(Bool(), default=False),
                "type": F(Enum(*MOUNT_TYPES), default="virtio-9p"),
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
    "mount-points": Setting(MapOf(_MOUNT, key=Str(MOUNT_TAG, "a mount tag")), {}, help="host directories shared with the VM"),
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


IMAGE_SCOPE = "image"  # the scope of a per-image template


class TemplateSet:
    """The templates of the configuration, and the per-image ones (see the module's docstring)."""

    def __init__(self, templates, default_resource_set=None, repos=None):
        """templates: {name: Template} as written in the files; default_resource_set:
        the name of the set resources.yaml marks default (None: no per-image
        templates); repos: the config's Repo list, highest priority first (also
        settable later with use_repositories())."""
        self.templates = templates  # name -> Template
        self.default_resource_set = default_resource_set
        self.repos = repos
        self._images = {}  # name -> Template or None: per-image templates looked up so far

    def use_repositories(self, repos):
        """Give the repositories whose images are per-image templates (the config loader calls it)."""
        self.repos = repos
        self._images = {}

    def __contains__(self, name):
        return name in self.templates or self._image_template(name) is not None

    def names(self, images=False):
        """Names of the written templates, sorted; images=True adds the per-image templates (reads every repository)."""
        names = set(self.templates)
        if images and self.default_resource_set and self.repos:
            from pcocc.images.store import ImageStore

            problems = []  # repositories that cannot be read: their images are not listed
            for rev in ImageStore(self.repos, "").list(problems=problems):
                if rev.name not in names:
                    with contextlib.suppress(PcoccError):
                        if self._image_template(rev.name) is not None:
                            names.add(rev.name)
        return sorted(names)

    def get(self, name):
        """The Template of that name: written in a file, else per-image. Raises NotFoundError."""
        tpl = self.templates.get(name) or self._image_template(name)
        if tpl is None:
            hint = "See 'pcocc template list'."
            if self.repos and not self.default_resource_set:
                hint += " (An image is a template of its name only when resources.yaml marks a resource set 'default: true'.)"
            raise NotFoundError(f"no template named '{name}'", hint)
        return tpl

    def _image_template(self, name):
        """The per-image template of name, or None (no default resource set, no such image, not a template name).

        Raises RepositoryError (one line) when a repository searched before the
        one holding the image cannot be read (e.g. the original's version 1).
        """
        if name in self.templates or not self.default_resource_set or not self.repos or not _TEMPLATE_NAME.fullmatch(name or ""):
            return None
        if name not in self._images:
            from pcocc.images.store import ImageStore

            found = ImageStore(self.repos, "").find_image(name)  # a repository that cannot be read says so
            tpl = None
            if found is not None:
                repo, image = found
                tpl = Template(name, IMAGE_SCOPE, f"(image {repo.name}:{image})", 0, {"image": f"{repo.name}:{image}"})
            self._images[name] = tpl
        return self._images[name]

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


# -- alloc/batch --image and --mount: per-cluster changes to the resolved templates

def _literal(path):
    """A path typed on the command line, kept as typed by the path templates (% doubled: pcocc.pathtpl)."""
    return path.replace("%", "%%")


def parse_image_options(values, templates):
    """{template: image} of alloc/batch --image values ([TPL=]IMAGE, repeatable).

    templates: the definition's template names, in order. A bare IMAGE is for
    the definition's only template; with several it is refused, as is a TPL
    that is not in the definition (named), a template given twice, or an
    image that is not an image URI [REPO:]NAME[@REV] (pcocc.images.uri).
    Raises UsageError (one line).
    """
    from pcocc.errors import UsageError
    from pcocc.images import uri

    names = list(dict.fromkeys(templates))
    out = {}
    for value in values:
        tpl, sep, image = value.partition("=")
        if not sep:
            tpl, image = None, value
            if len(names) != 1:
                raise UsageError(f"--image {value}: the definition has several templates ({', '.join(names)}): "
                                 f"say which with --image TEMPLATE=IMAGE")
            tpl = names[0]
        elif tpl not in names:
            raise UsageError(f"--image {value}: template '{tpl}' is not in the cluster definition ({', '.join(names)})")
        if tpl in out:
            raise UsageError(f"--image: template '{tpl}' is given two images ({out[tpl]}, {image})")
        uri.parse(image)  # its syntax now; its existence is checked with the templates' images
        out[tpl] = image.strip()
    return out


_MOUNT_OPTION = re.compile(r"([a-z]+)=(.*)", re.S)


def parse_mount_option(value, cwd, check_dir=False):
    """(tag, {path, type, readonly}) of an alloc/batch --mount value:
    TAG=PATH[,type=virtio-9p|virtio-fs][,readonly=true|false].

    The options are read from the end, so a PATH may hold commas; PATH is made
    absolute from cwd (~ expanded) and kept literal (no path templates).
    Defaults as a template's mount-points entry: virtio-9p, read-write.
    Raises UsageError (one line) for a missing or malformed tag, an empty
    path, an unknown or repeated option, a bad value, or (check_dir: the
    VMs run on this host) a PATH that is not a directory here.
    """
    import os

    from pcocc.errors import UsageError

    where = f"--mount {value}"
    tag, sep, rest = value.partition("=")
    if not sep:
        raise UsageError(f"{where}: expected TAG=PATH[,type=virtio-9p|virtio-fs][,readonly=true|false]")
    if not re.fullmatch(MOUNT_TAG, tag):
        raise UsageError(f"{where}: invalid tag '{tag}' (1 to 31 letters, digits, _ . -)")
    opts = {}
    while True:
        head, comma, last = rest.rpartition(",")
        m = _MOUNT_OPTION.fullmatch(last) if comma else None
        if not m:
            break
        key, val = m.groups()
        if key not in ("type", "readonly"):
            raise UsageError(f"{where}: unknown option '{key}' (options: type, readonly)")
        if key in opts:
            raise UsageError(f"{where}: option '{key}' given twice")
        if key == "type" and val not in MOUNT_TYPES:
            raise UsageError(f"{where}: type must be {' or '.join(MOUNT_TYPES)}, not '{val}'")
        if key == "readonly":
            if val.lower() not in ("true", "false"):
                raise UsageError(f"{where}: readonly must be true or false, not '{val}'")
            val = val.lower() == "true"
        opts[key] = val
        rest = head
    if not rest:
        raise UsageError(f"{where}: no PATH after '{tag}='")
    path = os.path.normpath(os.path.join(cwd, os.path.expanduser(rest)))
    if check_dir and (why := not_a_dir(path)):
        raise UsageError(f"{where}: {why}: {path}")
    return tag, {"path": _literal(path), "type": opts.get("type", "virtio-9p"),
                 "readonly": opts.get("readonly", False)}


def parse_mount_options(values, cwd, check_dir=False):
    """{tag: mount} of several --mount values (parse_mount_option); a tag given twice is a UsageError."""
    from pcocc.errors import UsageError

    out = {}
    for value in values:
        tag, mount = parse_mount_option(value, cwd, check_dir)
        if tag in out:
            raise UsageError(f"--mount: tag '{tag}' given twice")
        out[tag] = mount
    return out


def apply_overrides(resolved, overrides):
    """{name: Resolved} with a cluster's --image and --mount applied.

    resolved: {name: Resolved} of the definition's templates; overrides:
    {"images": {template: image}, "mounts": {tag: mount}} (either may be
    missing; None or {}: no change). An image replaces the template's (its
    origin becomes "--image"); mounts are added to every template's
    mount-points, replacing an entry of the same tag (origin "--mount").
    The VMs, the image checks and the checkpoints then see the result as
    the template's settings.
    """
    if not overrides:
        return resolved
    images, mounts = overrides.get("images") or {}, overrides.get("mounts") or {}
    out = {}
    for name, res in resolved.items():
        values, origin = dict(res.values), dict(res.origin)
        if name in images:
            values["image"], origin["image"] = images[name], "--image"
        if mounts:
            values["mount-points"] = {**(values.get("mount-points") or {}), **mounts}
            origin["mount-points"] = "--mount"
        out[name] = Resolved(res.name, res.scope, values, origin)
    return out


def snapshot_exclusions(resolved, overrides):
    """{template: why its snapshot ('pcocc template snapshot') must not start its VMs} for a
    cluster's --image and --mount: a template given another image; every template when the
    cluster has its own mount points (devices the snapshot does not have)."""
    overrides = overrides or {}
    images = overrides.get("images") or {}
    out = {}
    for name, res in resolved.items():
        if overrides.get("mounts"):
            out[name] = "the cluster has its own mount points (--mount)"
        elif name in images:
            out[name] = f"its VMs boot from {res.values['image']} (--image)"
    return out
