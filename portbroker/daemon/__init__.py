"""The portbroker daemon: a Unix-socket JSON-lines server around one Broker.

- :mod:`.protocol` — the wire protocol (sans-IO)
- :mod:`.server` — the server: clients, ownership, sharing, grace periods
- :mod:`.state` — the daemon's records in the state file (the file itself: :mod:`portbroker.state`)
"""
