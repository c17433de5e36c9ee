"""Tools for testing code that uses portbroker (as ``trio.testing`` is for trio).

- :class:`FakeGateway` — an in-process PCP + NAT-PMP server with fault knobs,
  in memory (for MockClock) or on UDP.
- :class:`FakeNetwork` — a network monitor whose default route, links and
  addresses the test changes (``open_broker(network_monitor=...)``).
- :class:`FakeIgd` — a UPnP IGD on 127.0.0.1 that serves a real device's
  description.
- :mod:`portbroker.testing.lab` — a real NAT gateway (miniupnpd + nftables) in
  network namespaces, for Linux as root.

Names are imported on first use, so ``python -m portbroker.testing.fake_gateway``
runs its module cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
    from portbroker.testing.fake_igd import FakeIgd
    from portbroker.testing.fake_network import FakeNetwork

__all__ = ["FakeGateway", "FakeIgd", "FakeNetwork", "MemoryLink"]


def __getattr__(name: str) -> Any:
    if name in ("FakeGateway", "MemoryLink"):
        from portbroker.testing import fake_gateway

        return getattr(fake_gateway, name)
    if name == "FakeIgd":
        from portbroker.testing import fake_igd

        return fake_igd.FakeIgd
    if name == "FakeNetwork":
        from portbroker.testing import fake_network

        return fake_network.FakeNetwork
    raise AttributeError(f"module 'portbroker.testing' has no attribute {name!r}")
