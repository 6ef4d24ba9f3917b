"""Private Ethernet between the VMs of a cluster (Open vSwitch + VXLAN), L2 or L3."""

from pcocc.config.schema import Bool, Enum, F, Int, Str, Struct
from pcocc.networks import NetworkType, register

_CIDR = Str(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", "an IPv4 network like 10.200.0.0/16")

SETTINGS = Struct(
    {
        "dev-prefix": F(Str(r"[a-zA-Z][a-zA-Z_0-9]{0,7}", "a device prefix (a letter, then up to 7 letters, digits or _)"), required=True),
        "network-layer": F(Enum("L2", "L3"), default="L3"),
        "mtu": F(Int(min=576, max=65535), default=1500),
        "mac-prefix": F(Str(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){0,3}", "1 to 4 hex octets like 52:54:00"), default="52:54:00"),
        "mac-start-offset": F(Int(min=0), default=0),
        "host-if-suffix": F(Str(), default=""),
        "int-network": F(_CIDR, default="10.200.0.0/16"),
        "ext-network": F(_CIDR, default="10.201.0.0/16"),
        "dns-server": F(Str(r"(\d{1,3}(\.\d{1,3}){3})?", "an IPv4 address"), default=""),
        "domain-name": F(Str(), default=""),
        "dns-search": F(Str(), default=""),
        "ntp-server": F(Str(), default=""),
        "allow-outbound": F(Enum("all", "none"), default="all"),
        "gateway": F(Enum("local-nat"), default="local-nat"),
        "manage-ip-forward": F(Bool(), default=True),
        "reverse-nat": F(
            Struct(
                {
                    "vm-port": F(Int(min=1, max=65535), required=True),
                    "min-host-port": F(Int(min=1, max=65535), required=True),
                    "max-host-port": F(Int(min=1, max=65535), required=True),
                }
            )
        ),
        # Ours: the Open vSwitch datapath (kernel 'system' in production, 'netdev' where there is no module).
        "datapath-type": F(Enum("system", "netdev"), default="system"),
    }
)

register(NetworkType("ethernet", ("eth",), SETTINGS, "private Ethernet over Open vSwitch and VXLAN"))
