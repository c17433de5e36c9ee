"""Tools for testing code that uses portbroker.

- :mod:`portbroker.testing.lab` — a real NAT gateway (miniupnpd + nftables) in
  network namespaces, for Linux as root.
"""
