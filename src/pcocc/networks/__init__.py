"""Network types. Each module registers its type with its settings schema and,
once it is implemented, its driver.

Config loading only needs the schemas (cheap). A driver is a class built with
the configured network (pcocc.config.models.Network) that has:
  needs_peers            whether its node side needs the other nodes' tunnel endpoints
  node_setup(job)        create the host objects of a job on this node (jobnet.NodeJob),
                         each recorded in job.undo before it is made
  nic_args(jobid, rank, index, nic_model)
                         the qemu arguments of the VM's NIC on this network
Both sides raise NotAvailableError for settings they cannot honour yet.
"""

from dataclasses import dataclass

from pcocc.errors import NotAvailableError

_TYPES = {}  # canonical name -> NetworkType
_ALIASES = {}  # any accepted `type:` value -> canonical name


@dataclass(frozen=True)
class NetworkType:
    name: str
    aliases: tuple
    settings: object  # a pcocc.config.schema checker (a Struct)
    description: str
    driver: type = None  # None: it can be configured, not used yet


def register(ntype):
    _TYPES[ntype.name] = ntype
    for alias in (ntype.name, *ntype.aliases):
        _ALIASES[alias] = ntype.name
    return ntype


def _load_builtin_types():
    # every one, even when one of them was imported directly before
    from pcocc.networks import bridged, ethernet, genericpci, infiniband  # noqa: F401 (they register)


def lookup(type_name):
    """The NetworkType for a `type:` value, or None when unknown."""
    _load_builtin_types()
    name = _ALIASES.get(type_name)
    return _TYPES.get(name) if name else None


def known_type_names():
    _load_builtin_types()
    return sorted(_ALIASES)


def driver(network):
    """The driver of a configured network; NotAvailableError when its type has none yet."""
    ntype = lookup(network.type)
    if ntype is None or ntype.driver is None:
        raise NotAvailableError(f"network '{network.name}': networks of type {network.type} are not available yet")
    return ntype.driver(network)
