"""Sans-IO codecs: bytes <-> frozen attrs objects. No sockets, no trio, no clock.

- :mod:`portbroker.wire.pcp` — PCP (RFC 6887)
- :mod:`portbroker.wire.natpmp` — NAT-PMP (RFC 6886)
- :mod:`portbroker.wire.ssdp` — SSDP search and NOTIFY (UPnP DA 1.1)

Every decoder raises :class:`portbroker.errors.MalformedMessage` (or a
subclass) and nothing else, whatever bytes it is fed.
"""
