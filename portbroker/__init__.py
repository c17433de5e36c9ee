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
from portbroker.epoch import (
    EpochCheck,
    EpochObservation,
    EpochTracker,
    check_natpmp_epoch,
    check_pcp_epoch,
)
from portbroker.errors import (
    GatewayNotFound,
    LinkError,
    MalformedMessage,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    NoMethodAvailable,
    PortBrokerError,
    RequestUnsupported,
    UnsupportedOpcode,
    UnsupportedVersion,
    UpnpError,
)
from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    Failed,
    LifecycleError,
    Lost,
    MappingEvent,
    ReachabilityChanged,
    Released,
    Renewed,
    Restored,
    State,
)
from portbroker.reachability import Reachability
from portbroker.types import (
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    METHOD_NAMES,
    MIN_LIFETIME,
    Lease,
    MappingRequest,
    ProbeOutcome,
    ProbeReport,
    RemoteFilter,
    TransportProtocol,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "METHOD_NAMES",
    "MIN_LIFETIME",
    "Acquired",
    "Broker",
    "BrokerEvent",
    "EpochCheck",
    "EpochObservation",
    "EpochTracker",
    "ExternalAddressChanged",
    "Failed",
    "GatewayNotFound",
    "Lease",
    "LifecycleError",
    "LinkError",
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
    "Reachability",
    "ReachabilityChanged",
    "Released",
    "RemoteFilter",
    "Renewed",
    "RequestUnsupported",
    "Restored",
    "State",
    "TransportProtocol",
    "UnsupportedOpcode",
    "UnsupportedVersion",
    "UpnpError",
    "__version__",
    "check_natpmp_epoch",
    "check_pcp_epoch",
    "open_broker",
]
