"""Network types. Each module registers its type with its settings schema and its driver.

Config loading only needs the schemas (cheap). A driver (a Driver) is built with
the configured network (pcocc.config.models.Network) and has:
  check()                a node-side check of the settings (before anything is made)
  node_setup(job)        create the host objects of a job on this node (jobnet.NodeJob),
                         each recorded in job.undo before it is made; returns what the
                         node publishes in its record's "objects"
  nic_args(jobid, rank, index, nic_model[, objects])
                         the qemu arguments of the VM's device on this network
  mac(jobid, rank)       (NIC types) the MAC of the VM's NIC
and the capabilities below. Either side raises NotAvailableError for settings it cannot honour.
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


class Driver:
    needs_peers = False  # its node side needs the other nodes' tunnel endpoints
    migratable = True  # a checkpoint can carry its VM device (not so for host devices passed through)
    uses_node_objects = False  # nic_args needs what node setup published (which VF a VM got)

    def __init__(self, network):
        self.network = network
        self.settings = network.settings

    def check(self):
        pass


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
