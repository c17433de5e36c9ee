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

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
        GatewayChanged,
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

# The names above are imported when first used (PEP 562), not with the
# package: `portbroker list` through the daemon imports portbroker.cli, and
# the broker (trio and every method) would be most of its run time
# (docs/performance.md, benchmarks/cli_daemon.py).
_LAZY: dict[str, str] = {
    "Broker": "portbroker.broker",
    "BrokerEvent": "portbroker.broker",
    "Mapping": "portbroker.broker",
    "open_broker": "portbroker.broker",
    "EpochCheck": "portbroker.epoch",
    "EpochObservation": "portbroker.epoch",
    "EpochTracker": "portbroker.epoch",
    "check_natpmp_epoch": "portbroker.epoch",
    "check_pcp_epoch": "portbroker.epoch",
    "GatewayNotFound": "portbroker.errors",
    "LinkError": "portbroker.errors",
    "MalformedMessage": "portbroker.errors",
    "MappingError": "portbroker.errors",
    "MethodUnavailable": "portbroker.errors",
    "NoAnswer": "portbroker.errors",
    "NoMethodAvailable": "portbroker.errors",
    "PortBrokerError": "portbroker.errors",
    "RequestUnsupported": "portbroker.errors",
    "UnsupportedOpcode": "portbroker.errors",
    "UnsupportedVersion": "portbroker.errors",
    "UpnpError": "portbroker.errors",
    "Acquired": "portbroker.lifecycle",
    "ExternalAddressChanged": "portbroker.lifecycle",
    "Failed": "portbroker.lifecycle",
    "GatewayChanged": "portbroker.lifecycle",
    "LifecycleError": "portbroker.lifecycle",
    "Lost": "portbroker.lifecycle",
    "MappingEvent": "portbroker.lifecycle",
    "ReachabilityChanged": "portbroker.lifecycle",
    "Released": "portbroker.lifecycle",
    "Renewed": "portbroker.lifecycle",
    "Restored": "portbroker.lifecycle",
    "State": "portbroker.lifecycle",
    "Reachability": "portbroker.reachability",
    "DEFAULT_LIFETIME": "portbroker.types",
    "MAX_LIFETIME": "portbroker.types",
    "METHOD_NAMES": "portbroker.types",
    "MIN_LIFETIME": "portbroker.types",
    "Lease": "portbroker.types",
    "MappingRequest": "portbroker.types",
    "ProbeOutcome": "portbroker.types",
    "ProbeReport": "portbroker.types",
    "RemoteFilter": "portbroker.types",
    "TransportProtocol": "portbroker.types",
}


# Hidden from type checkers: a module __getattr__ they can see makes every
# unknown name an `object` (a misspelt `portbroker.open_brokr` would pass);
# they know the real names from the TYPE_CHECKING imports above.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        import importlib

        module = _LAZY.get(name)
        if module is None:
            # A submodule, as `import portbroker` made them attributes before
            # the names went lazy (`portbroker.errors.MappingError`,
            # `portbroker.wire.pcp`). Never a private or dunder name: a tool
            # probing `__main__` or `__wrapped__` must not import (or run) one,
            # and `from portbroker import _cli_help` (the CLI's every start)
            # comes here first: it must not pay for importlib.util.
            if name.startswith("_"):
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
            import importlib.util

            if importlib.util.find_spec(f"{__name__}.{name}"):
                return importlib.import_module(f"{__name__}.{name}")
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # once: later lookups do not come here
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "GatewayChanged",
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
