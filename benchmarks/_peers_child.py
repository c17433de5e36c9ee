"""One library's map, delete (and for portbroker, hold), in one process in the lab's lan namespace.

``benchmarks/peers.py`` starts this under ``ip netns exec <lan ns>`` (never in
the root namespace: the peers discover by multicast or the default route), as

    python _peers_child.py TOOL PORT LIFETIME

It times, inside this process, the library's own discovery plus one mapping
of TCP PORT (imports are not timed: an app pays them once), prints one JSON
line, ``{"event": "mapped", "elapsed": s, "external_port": n}`` or
``{"event": "failed", "elapsed": s, "error": "..."}``, then waits for a line
on stdin: ``delete`` deletes the mapping with the same library and prints
``{"event": "deleted", "ok": bool, ...}``; end of input does the same. The
portbroker broker stays open until then, renewing and restoring its mapping,
which is how the gateway-restart figure is taken.
"""

# Each peer library raises its own exceptions (socket errors, its own
# classes, asyncio timeouts); whatever it raises is that attempt's failure,
# so the handlers below catch Exception on purpose.
# ruff: noqa: BLE001

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from ipaddress import IPv4Address
from pathlib import Path
from types import ModuleType
from typing import Any

LAN_ADDRESS = "192.168.77.2"  # the lab's lan host (portbroker/testing/lab.py)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def wait_for_delete() -> None:
    sys.stdin.readline()  # "delete\n", or "" at end of input: either way, delete


def natpmp_module(which: str) -> ModuleType:
    """NAT-PMP's or py-natpmp's module, loaded from its file.

    Both packages install a package named ``natpmp`` and both ship
    ``natpmp/__init__.py``: NAT-PMP's holds its code, py-natpmp's only says
    ``from natpmp.NATPMP import *``. Whichever pip installed last owns
    ``__init__.py`` (scripts/setup reinstalls NAT-PMP's), so each is loaded
    from its own file rather than by ``import natpmp``.
    """
    spec = importlib.util.find_spec("natpmp")
    if spec is None or spec.origin is None:
        raise ImportError("no natpmp package installed (pip install -e '.[bench]')")
    folder = Path(spec.origin).parent
    path = folder / ("NATPMP.py" if which == "py-natpmp" else "__init__.py")
    text = path.read_text() if path.exists() else ""
    if which == "py-natpmp" and not text:
        raise ImportError("py-natpmp is not installed (natpmp/NATPMP.py is missing)")
    if which == "NAT-PMP" and "def map_port" not in text:
        raise ImportError(
            "NAT-PMP's natpmp/__init__.py was overwritten by py-natpmp's "
            "(both install the package natpmp); reinstall NAT-PMP"
        )
    module_spec = importlib.util.spec_from_file_location(f"_bench_{which}", path)
    assert module_spec is not None
    assert module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# -- each library: map, then (on the driver's word) delete ----------------------


def run_natpmp(which: str, port: int, lifetime: int) -> None:
    module = natpmp_module(which)
    tcp = module.NATPMP_PROTOCOL_TCP
    started = time.perf_counter()
    try:
        # gateway_ip=None: the library finds the default route itself
        # (netifaces), its own discovery.
        response = module.map_port(tcp, port, port, lifetime, gateway_ip=None, use_exception=True)
    except Exception as exc:
        emit(event="failed", elapsed=time.perf_counter() - started, error=describe(exc))
        return
    elapsed = time.perf_counter() - started
    if response.result != 0:
        emit(event="failed", elapsed=elapsed, error=f"result code {response.result}")
        return
    emit(event="mapped", elapsed=elapsed, external_port=response.public_port)
    wait_for_delete()
    try:
        module.map_port(tcp, port, port, 0, gateway_ip=None, use_exception=True)
        emit(event="deleted", ok=True)
    except Exception as exc:
        emit(event="deleted", ok=False, error=describe(exc))


def run_miniupnpc(port: int, lifetime: int) -> None:
    import miniupnpc  # type: ignore[import-not-found,unused-ignore]  # a C module, no stubs

    upnp = miniupnpc.UPnP()
    started = time.perf_counter()
    try:
        found = upnp.discover()
        if not found:
            raise RuntimeError("discover() found no UPnP device")
        upnp.selectigd()
        ok = upnp.addportmapping(port, "TCP", upnp.lanaddr, port, "bench", "", lifetime)
        if not ok:
            raise RuntimeError("addportmapping returned False")
    except Exception as exc:
        emit(event="failed", elapsed=time.perf_counter() - started, error=describe(exc))
        return
    emit(event="mapped", elapsed=time.perf_counter() - started, external_port=port)
    wait_for_delete()
    try:
        emit(event="deleted", ok=bool(upnp.deleteportmapping(port, "TCP")))
    except Exception as exc:
        emit(event="deleted", ok=False, error=describe(exc))


def run_async_upnp(port: int, lifetime: int) -> None:
    asyncio.run(_async_upnp(port, lifetime))


async def _async_upnp(port: int, lifetime: int) -> None:
    from async_upnp_client.aiohttp import AiohttpRequester
    from async_upnp_client.client_factory import UpnpFactory
    from async_upnp_client.profiles.igd import IgdDevice

    started = time.perf_counter()
    wildcard = IPv4Address("0.0.0.0")  # the profile wants an address; "" is the wildcard
    try:
        # The profile's own discovery: an ssdp:all search that listens for
        # its whole timeout (4 s by default) before it returns.
        found = await IgdDevice.async_search()
        if not found:
            raise RuntimeError("IgdDevice.async_search() found no IGD")
        location = sorted(str(response["location"]) for response in found)[0]
        device = await UpnpFactory(AiohttpRequester()).async_create_device(location)
        igd = IgdDevice(device, None)
        await igd.async_add_port_mapping(
            wildcard,
            port,
            "TCP",
            port,
            IPv4Address(LAN_ADDRESS),
            True,
            "bench",
            timedelta(seconds=lifetime),
        )
    except Exception as exc:
        emit(event="failed", elapsed=time.perf_counter() - started, error=describe(exc))
        return
    emit(event="mapped", elapsed=time.perf_counter() - started, external_port=port)
    await asyncio.get_running_loop().run_in_executor(None, wait_for_delete)
    try:
        await igd.async_delete_port_mapping(wildcard, port, "TCP")
        emit(event="deleted", ok=True)
    except Exception as exc:
        emit(event="deleted", ok=False, error=describe(exc))


def run_portbroker(port: int, lifetime: int) -> None:
    import trio

    trio.run(_portbroker, port, lifetime)


async def _portbroker(port: int, lifetime: int) -> None:
    import trio

    import portbroker

    # portbroker imports its modules lazily (portbroker/__init__.py), on the
    # first open_broker(); load them now so that, like every library's here,
    # imports stay out of the figure.
    import portbroker.broker
    import portbroker.methods.natpmp
    import portbroker.methods.pcp
    import portbroker.methods.upnp
    import portbroker.probe

    started = time.perf_counter()
    try:
        # No gateway given: the default route, as an app would (RFC 6887 §8.1).
        async with portbroker.open_broker(probe_timeout=2.0) as broker:
            try:
                mapping = await broker.map(port, "tcp", lifetime=lifetime)
            except portbroker.PortBrokerError as exc:
                emit(event="failed", elapsed=time.perf_counter() - started, error=describe(exc))
                return
            emit(
                event="mapped",
                elapsed=time.perf_counter() - started,
                external_port=mapping.external_port,
                method=mapping.method,
            )
            # The broker renews and restores the mapping meanwhile.
            await trio.to_thread.run_sync(wait_for_delete)
            try:
                await mapping.release()
                emit(event="deleted", ok=True)
            except portbroker.PortBrokerError as exc:
                emit(event="deleted", ok=False, error=describe(exc))
    except portbroker.PortBrokerError as exc:
        emit(event="failed", elapsed=time.perf_counter() - started, error=describe(exc))


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


TOOLS: dict[str, Callable[[int, int], None]] = {
    "portbroker": run_portbroker,
    "miniupnpc": run_miniupnpc,
    "NAT-PMP": lambda port, lifetime: run_natpmp("NAT-PMP", port, lifetime),
    "py-natpmp": lambda port, lifetime: run_natpmp("py-natpmp", port, lifetime),
    "async-upnp-client": run_async_upnp,
}


def main() -> int:
    tool, port, lifetime = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    try:
        TOOLS[tool](port, lifetime)
    except ImportError as exc:
        emit(event="unavailable", error=describe(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
