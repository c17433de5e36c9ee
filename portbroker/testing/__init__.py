"""Tools for testing code that uses portbroker (as ``trio.testing`` is for trio).

- :class:`FakeGateway` — an in-process PCP + NAT-PMP server with fault knobs,
  in memory (for MockClock) or on UDP.
- :class:`FakeIgd` — a UPnP IGD on 127.0.0.1 that serves a real device's
  description.
- :mod:`portbroker.testing.lab` — a real NAT gateway (miniupnpd + nftables) in
  network namespaces, for Linux as root.
"""

from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.testing.fake_igd import FakeIgd

__all__ = ["FakeGateway", "FakeIgd", "MemoryLink"]
