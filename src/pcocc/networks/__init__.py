"""Network types. Each module registers its type with its settings schema.

Config loading only needs the schemas (cheap); the host-side drivers of a
type are imported by its module when a node is set up.
"""

from dataclasses import dataclass

_TYPES = {}  # canonical name -> NetworkType
_ALIASES = {}  # any accepted `type:` value -> canonical name


@dataclass(frozen=True)
class NetworkType:
    name: str
    aliases: tuple
    settings: object  # a pcocc.config.schema checker (a Struct)
    description: str


def register(ntype):
    _TYPES[ntype.name] = ntype
    for alias in (ntype.name, *ntype.aliases):
        _ALIASES[alias] = ntype.name
    return ntype


def _load_builtin_types():
    from pcocc.networks import bridged, ethernet, genericpci, infiniband  # noqa: F401 (they register)


def lookup(type_name):
    """The NetworkType for a `type:` value, or None when unknown."""
    if not _TYPES:
        _load_builtin_types()
    name = _ALIASES.get(type_name)
    return _TYPES.get(name) if name else None


def known_type_names():
    if not _TYPES:
        _load_builtin_types()
    return sorted(_ALIASES)
