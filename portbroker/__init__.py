"""portbroker: make a host reachable from outside its NAT or firewall.

It asks the gateway for explicit port mappings with PCP (RFC 6887), NAT-PMP
(RFC 6886) or UPnP IGD, and keeps them alive. This is the one public import
surface; modules not re-exported here are internal unless documented.
"""

from portbroker.epoch import EpochCheck, EpochObservation, check_natpmp_epoch, check_pcp_epoch
from portbroker.errors import (
    MalformedMessage,
    PortBrokerError,
    UnsupportedOpcode,
    UnsupportedVersion,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "EpochCheck",
    "EpochObservation",
    "MalformedMessage",
    "PortBrokerError",
    "UnsupportedOpcode",
    "UnsupportedVersion",
    "__version__",
    "check_natpmp_epoch",
    "check_pcp_epoch",
]
