"""A tap per VM on an existing host bridge."""

from pcocc.config.schema import F, Int, ListOf, Str, Struct
from pcocc.networks import NetworkType, register

SETTINGS = Struct(
    {
        "host-bridge": F(Str(), required=True),
        "tap-prefix": F(Str(r"[a-zA-Z][a-zA-Z_0-9-]{0,7}", "a device prefix of up to 8 characters"), required=True),
        "mtu": F(Int(min=576, max=65535), default=1500),
        # Ours: 802.1Q VLANs on the VM's port.
        "vlans": F(
            Struct(
                {
                    "native": F(Int(min=1, max=4094)),
                    "tagged": F(ListOf(Int(min=1, max=4094))),
                }
            )
        ),
    }
)

register(NetworkType("bridged", ("bridged-ethernet",), SETTINGS, "a tap on an existing host bridge"))
