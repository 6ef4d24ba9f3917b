"""InfiniBand SR-IOV virtual functions: with PKey isolation (infiniband) or without (hostib)."""

from pcocc.config.schema import F, Str, Struct
from pcocc.networks import NetworkType, register

_PKEY = Str(r"0x[0-9a-fA-F]{4}", "a PKey like 0x2000")

SETTINGS = Struct(
    {
        "host-device": F(Str(), required=True),
        "min-pkey": F(_PKEY, required=True),
        "max-pkey": F(_PKEY, required=True),
        "license": F(Str()),
        "opensm-daemon": F(Str(), required=True),
        "opensm-partition-cfg": F(Str(), required=True),
        "opensm-partition-tpl": F(Str(), required=True),
    }
)

HOSTIB_SETTINGS = Struct({"host-device": F(Str(), required=True)})

register(NetworkType("infiniband", ("ib",), SETTINGS, "InfiniBand SR-IOV with a PKey per cluster"))
register(NetworkType("hostib", ("host-infiniband",), HOSTIB_SETTINGS, "InfiniBand SR-IOV without PKey isolation"))
