"""Generic PCI passthrough of listed host devices through VFIO."""

from pcocc.config.schema import F, ListOf, Str, Struct
from pcocc.networks import NetworkType, register

_PCI_ADDR = Str(r"([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", "a PCI address like 0000:03:00.1")

SETTINGS = Struct(
    {
        "host-device-addrs": F(ListOf(_PCI_ADDR), required=True),
        "host-driver": F(Str(), required=True),
    }
)

register(NetworkType("genericpci", (), SETTINGS, "PCI devices passed through with VFIO"))
