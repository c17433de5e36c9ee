"""portbroker: make a host reachable from outside its NAT or firewall.

It asks the gateway for explicit port mappings with PCP (RFC 6887), NAT-PMP
(RFC 6886) or UPnP IGD, and keeps them alive::

    async with portbroker.open_broker() as broker:
        async with broker.open_mapping(8080, "tcp") as mapping:
            print(mapping.external_address, mapping.external_port)
            async for event in mapping.events():
                ...

This is the one public import surface; modules not re-exported here are
internal unless documented (``portbroker.wire``, ``portbroker.testing``).
"""

from portbroker.broker import Broker, BrokerEvent, Mapping, open_broker
from portbroker.epoch import EpochCheck, EpochObservation, check_natpmp_epoch, check_pcp_epoch
from portbroker.errors import (
    GatewayNotFound,
    MalformedMessage,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    PortBrokerError,
    UnsupportedOpcode,
    UnsupportedVersion,
)
from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    Failed,
    Lost,
    MappingEvent,
    Released,
    Renewed,
    Restored,
    State,
)
from portbroker.probe import NoMethodAvailable
from portbroker.types import (
    METHOD_NAMES,
    Lease,
    MappingRequest,
    ProbeOutcome,
    ProbeReport,
    TransportProtocol,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "METHOD_NAMES",
    "Acquired",
    "Broker",
    "BrokerEvent",
    "EpochCheck",
    "EpochObservation",
    "ExternalAddressChanged",
    "Failed",
    "GatewayNotFound",
    "Lease",
    "Lost",
    "MalformedMessage",
    "Mapping",
    "MappingError",
    "MappingEvent",
    "MappingRequest",
    "MethodUnavailable",
    "NoAnswer",
    "NoMethodAvailable",
    "PortBrokerError",
    "ProbeOutcome",
    "ProbeReport",
    "Released",
    "Renewed",
    "Restored",
    "State",
    "TransportProtocol",
    "UnsupportedOpcode",
    "UnsupportedVersion",
    "__version__",
    "check_natpmp_epoch",
    "check_pcp_epoch",
    "open_broker",
]
