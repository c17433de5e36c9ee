"""DNS-SD publication and browsing of mapped services, with zeroconf (docs/dnssd.md).

A mapped service is published on the LAN as a DNS-SD service instance
(RFC 6763) over multicast DNS (RFC 6762):

- SRV and A/AAAA: the *internal* endpoint (the host's own address toward the
  gateway and the internal port), which peers on the same LAN reach directly;
- TXT (RFC 6763 §6): the *external* endpoint the gateway maps to it, how
  (``method``), whether that address is publicly reachable, and the
  mapping's state (:data:`TXT_KEYS`).

:meth:`Rendezvous.publish` follows a :class:`~portbroker.broker.Mapping`'s
events: ``Restored`` / ``ExternalAddressChanged`` (and a renewal that moved
the external endpoint) update the TXT record; ``Lost`` keeps the record (the
internal endpoint still works on the LAN) but drops the external endpoint and
says ``state=lost`` until ``Restored``; ``Released`` / ``Failed`` withdraw it
with goodbye packets (RFC 6762 §10.1). :meth:`Rendezvous.browse` gives each
peer's internal and external endpoints, as a snapshot or as changes.

zeroconf runs on asyncio in threads of its own. The bridge to trio is one
class, :class:`ZeroconfThread`: one thread owns an asyncio loop and the
``AsyncZeroconf`` on it; trio calls into it with :meth:`ZeroconfThread.run`
(``asyncio.run_coroutine_threadsafe``, woken back through the trio token,
never blocking either loop), and zeroconf's browse callbacks reach trio
through a :class:`_PeerTable` (a lock, a coalescing dirty set, at most one
wake-up pending). Nothing else in this module touches the other thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import attrs
import trio
import trio.lowlevel

from portbroker.errors import PortBrokerError
from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    Failed,
    Lost,
    Released,
    Renewed,
    Restored,
)
from portbroker.reachability import classify
from portbroker.types import IPAddress, Lease

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

    from portbroker.broker import Mapping as BrokerMapping

__all__ = [
    "MAX_PEERS",
    "TXT_KEYS",
    "Advert",
    "Browser",
    "Peer",
    "PeerChange",
    "Publication",
    "Rendezvous",
    "RendezvousError",
    "ZeroconfThread",
    "advert_for",
    "check_instance_name",
    "check_service_type",
    "check_txt",
    "open_rendezvous",
    "peer_from_txt",
    "shielded",
]

logger = logging.getLogger("portbroker.rendezvous")
T = TypeVar("T")

# The TXT keys portbroker writes (RFC 6763 §6.4: short, case-insensitive,
# printable ASCII without '='; §6.7: txtvers first). A caller's extra keys may
# not reuse them.
TXT_KEYS: Final = ("txtvers", "ext_addr", "ext_port", "method", "public", "state", "rev")
TXT_VERSION: Final = "1"
# The TXT ``method`` values portbroker writes (a lease's method).
_METHODS: Final = frozenset({"pcp", "natpmp", "upnp"})
# RFC 6763 §6.2: a TXT record should stay under 1300 bytes to fit in a packet.
MAX_TXT_BYTES: Final = 1300
# Extra entries that could fit at all: each takes at least 3 bytes (a length
# byte, a one-character key, '=').
MAX_TXT_ENTRIES: Final = MAX_TXT_BYTES // 3
# Peers one browser keeps (a table in the zeroconf thread): past this, new
# names are ignored and counted in Browser.dropped (logged once). It bounds
# both the table and the set of changes waiting for trio.
MAX_PEERS: Final = 1024
# Internal addresses kept of one peer (zeroconf caches every A/AAAA record a
# host sends for its SRV target): a host has a few, not thousands.
MAX_PEER_ADDRESSES: Final = 16
# How long a goodbye and zeroconf's own close may take when a Rendezvous
# closes (shielded: closing always unregisters).
CLOSE_TIMEOUT: Final = 10.0
# How long resolving one peer's SRV/TXT/A may take (zeroconf: milliseconds).
RESOLVE_TIMEOUT_MS: Final = 3000
# A replaced record leaves the cache one second after the new one came
# (RFC 6762 §10.2): a peer is read again this long after it changed.
CACHE_FLUSH_DELAY: Final = 1.2

_SERVICE_TYPE = re.compile(r"^_(?P<name>[A-Za-z0-9-]{1,15})\._(?P<proto>tcp|udp)(?:\.local)?\.?$")


class RendezvousError(PortBrokerError):
    """A publication or browse refused: a bad name, a name taken, a closed rendezvous."""


# -- validation (pure) ------------------------------------------------------------


def check_service_type(value: object) -> str:
    """``"_http._tcp"`` (``.local.`` optional) -> ``"_http._tcp.local."``.

    RFC 6763 §7: ``_<service>._tcp`` or ``._udp``; RFC 6335 §5.1: the service
    name is 1-15 letters, digits and hyphens, with at least one letter, no
    hyphen first, last or twice in a row.
    """
    if not isinstance(value, str):
        raise RendezvousError(f"the service type must be a string, not {type(value).__name__}")
    match = _SERVICE_TYPE.match(value)
    if match is None:
        raise RendezvousError(
            f"service type {value[:80]!r} is not of the form '_name._tcp.local.' or"
            " '_name._udp.local.' (RFC 6763 §7), for example '_http._tcp.local.'"
        )
    name = match["name"]
    if (
        not re.search("[A-Za-z]", name)
        or name.startswith("-")
        or name.endswith("-")
        or "--" in name
    ):
        raise RendezvousError(
            f"service name {name!r} in {value!r}: letters, digits and single hyphens,"
            " at least one letter, no hyphen first or last (RFC 6335 §5.1)"
        )
    return f"_{name.lower()}._{match['proto']}.local."


def check_instance_name(value: object) -> str:
    """A DNS-SD instance name: 1-63 bytes of UTF-8, no control characters (RFC 6763 §4.1.1)."""
    if not isinstance(value, str):
        raise RendezvousError(f"the instance name must be a string, not {type(value).__name__}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= 63:
        raise RendezvousError(
            f"the instance name must be 1..63 bytes of UTF-8 (RFC 6763 §4.1.1), got {size}"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise RendezvousError(
            "the instance name may not contain control characters (RFC 6763 §4.1.1)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RendezvousError("the instance name is not valid Unicode text") from None
    if value.startswith(".") or value.endswith(".") or ".." in value:
        # zeroconf sends a dot as a label separator (no RFC 6763 §4.3 escape):
        # an empty label makes a name no browser resolves, though its
        # registration succeeds.
        raise RendezvousError(
            f"the instance name {value!r} may not start or end with '.' or hold '..'"
            " (zeroconf sends each dot as a label break)"
        )
    return value


def check_txt(extra: Mapping[str, str] | None) -> dict[str, str]:
    """A caller's extra TXT keys, checked (RFC 6763 §6.4, §6.5); ours are refused."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise RendezvousError("extra TXT must be a mapping of key to value")
    if len(extra) > MAX_TXT_ENTRIES:
        # Refused before each is looked at: a 64 KiB daemon request holds
        # thousands, and the daemon serves everyone from one thread.
        raise RendezvousError(
            f"{len(extra)} extra TXT entries; at most {MAX_TXT_ENTRIES} fit in a TXT record"
            f" of {MAX_TXT_BYTES} bytes (RFC 6763 §6.2)"
        )
    out: dict[str, str] = {}
    seen: set[str] = set()  # keys lowered (RFC 6763 §6.4: case-insensitive)
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise RendezvousError("extra TXT keys and values must be strings")
        if not key or not all(0x20 < ord(c) < 0x7F and c != "=" for c in key):
            raise RendezvousError(
                f"TXT key {key[:40]!r}: printable ASCII without spaces or '=' (RFC 6763 §6.4)"
            )
        if len(key) > 9:
            # §6.4: "SHOULD be no more than nine characters"; we hold callers to it.
            raise RendezvousError(f"TXT key {key!r} is longer than 9 characters (RFC 6763 §6.4)")
        if key.lower() in TXT_KEYS:
            raise RendezvousError(
                f"TXT key {key!r} is portbroker's own ({', '.join(TXT_KEYS)}); pick another"
            )
        if key.lower() in seen:
            raise RendezvousError(f"TXT key {key!r} given twice (keys are case-insensitive)")
        seen.add(key.lower())
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate: a JSON "\udcff", or a command-line byte that
            # is not UTF-8 (Python's surrogateescape).
            raise RendezvousError(f"TXT value of {key!r} is not valid UTF-8 text") from None
        if len(key) + 1 + len(encoded) > 255:
            raise RendezvousError(f"TXT entry {key!r} is longer than 255 bytes (RFC 6763 §6.1)")
        out[key] = value
    return out


def _is_public(address: IPAddress | None) -> bool:
    """Whether *address* is globally routable (the TXT ``public`` key): the
    broker's one rule, :func:`portbroker.reachability.classify`."""
    return address is not None and classify(address).public


# -- what is published ------------------------------------------------------------


@attrs.frozen
class Advert:
    """One service instance's records: SRV/A for *internal*, TXT for the rest."""

    service_type: str = attrs.field(converter=check_service_type)
    name: str = attrs.field(converter=check_instance_name)
    internal_address: IPAddress = attrs.field(converter=ipaddress.ip_address)
    internal_port: int
    external_address: IPAddress | None = None
    external_port: int | None = None
    method: str | None = None
    state: Literal["up", "lost"] = "up"
    extra: Mapping[str, str] = attrs.field(factory=dict, converter=check_txt)
    host: str | None = None  # the SRV target; None: derived from the host name and address
    # Counts the publication's updates, so that no two versions of its TXT
    # record are the same: a browser's zeroconf treats a TXT equal to one it
    # still holds (a replaced record stays cached until its cleanup, RFC 6762
    # §10.2) as a refresh and reports no change, so "up -> lost -> up" would
    # leave it at "lost".
    revision: int = 0

    def txt(self) -> dict[str, str]:
        """The TXT record's keys (docs/dnssd.md)."""
        out = {"txtvers": TXT_VERSION}
        if self.state == "up" and self.external_address is not None:
            out["ext_addr"] = str(self.external_address)
            out["ext_port"] = str(self.external_port)
            out["public"] = "1" if _is_public(self.external_address) else "0"
        if self.method is not None:
            out["method"] = self.method
        out["state"] = self.state
        out["rev"] = str(self.revision)
        out.update(self.extra)
        size = sum(len(k) + 1 + len(v.encode()) + 1 for k, v in out.items())
        if size > MAX_TXT_BYTES:
            raise RendezvousError(
                f"the TXT record would be {size} bytes; keep it under {MAX_TXT_BYTES}"
                " (RFC 6763 §6.2)"
            )
        return out

    def server(self) -> str:
        """The SRV target: unique per address, since hosts of one machine's
        namespaces (or containers) share a host name."""
        if self.host is not None:
            return self.host if self.host.endswith(".") else self.host + "."
        base = re.sub("[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"
        tail = re.sub("[^0-9A-Fa-f]", "-", str(self.internal_address))
        return f"{base[: 62 - len(tail)]}-{tail}.local."

    @property
    def key(self) -> str:
        """zeroconf's registry key: the full instance name, lower case."""
        return f"{self.name}.{self.service_type}".lower()


def advert_for(
    lease: Lease,
    service_type: str,
    name: str,
    *,
    state: Literal["up", "lost"] = "up",
    extra: Mapping[str, str] | None = None,
    host: str | None = None,
) -> Advert:
    """The advert of a mapping's lease: its service type must match its protocol."""
    service_type = check_service_type(service_type)
    proto = service_type.split(".")[1][1:]
    if proto != lease.protocol.value:
        raise RendezvousError(
            f"service type {service_type!r} is {proto.upper()}, but the mapping is"
            f" {lease.protocol.value.upper()}: use '_name._{lease.protocol.value}.local.'"
        )
    return Advert(
        service_type,
        name,
        lease.internal_address,
        lease.internal_port,
        lease.external_address,
        lease.external_port,
        lease.method,
        state,
        dict(extra or {}),
        host,
    )


# -- what a browser sees ----------------------------------------------------------


@attrs.frozen
class Peer:
    """A service instance seen on the LAN, with both of its endpoints.

    ``internal``: (address, port) for each address its SRV target has;
    ``external``: the mapped endpoint from TXT, None when the peer has none
    now (``state`` ``lost``) or is not a portbroker publisher.
    """

    name: str
    service_type: str
    host: str | None
    internal: tuple[tuple[IPAddress, int], ...]
    external: tuple[IPAddress, int] | None
    method: str | None
    public: bool | None
    state: str | None
    txt: Mapping[str, str | None] = attrs.field(factory=dict, eq=True, hash=False)


@attrs.frozen
class PeerChange:
    """``added`` / ``updated`` (with the peer as it is now) or ``removed`` (peer None)."""

    kind: Literal["added", "updated", "removed"]
    name: str
    peer: Peer | None


def peer_from_txt(
    name: str,
    service_type: str,
    host: str | None,
    addresses: Sequence[str],
    port: int | None,
    txt: Mapping[str, str | None],
) -> Peer:
    """A :class:`Peer` from resolved records; malformed TXT values read as absent.

    Any LAN host can send any TXT: ``method`` and ``state`` are one of the
    values portbroker writes or None (never a stranger's text, which a shell
    would print), ``ext_port`` is ASCII digits (``int`` would take " 80",
    "+80" or Arabic-Indic digits), and ``public`` is what the broker's rule
    says of ``ext_addr``, not what the peer claims (None without one).
    """
    lowered = {k.lower(): v for k, v in txt.items()}
    external: tuple[IPAddress, int] | None = None
    port_text = lowered.get("ext_port") or ""
    addr_text = lowered.get("ext_addr") or ""
    # No zone: a gateway's external address has none, and ipaddress keeps any
    # text after a '%' (a terminal escape too) as the scope.
    if port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and "%" not in addr_text:
        ext_port = int(port_text)
        with contextlib.suppress(ValueError):
            if 1 <= ext_port <= 65535:
                external = (ipaddress.ip_address(addr_text), ext_port)
    internal: list[tuple[IPAddress, int]] = []
    if port:
        for text in addresses:
            with contextlib.suppress(ValueError):
                endpoint = (ipaddress.ip_address(text.split("%")[0]), port)
                if endpoint not in internal:
                    internal.append(endpoint)
            if len(internal) >= MAX_PEER_ADDRESSES:
                break  # a LAN host may pile up A/AAAA records for its SRV target
    method = lowered.get("method")
    state = lowered.get("state")
    return Peer(
        name,
        service_type,
        host,
        tuple(internal),
        external,
        method if method in _METHODS else None,
        None if external is None else _is_public(external[0]),
        state if state in ("up", "lost") else None,
        dict(txt),
    )


def _instance(full_name: str, service_type: str) -> str:
    suffix = "." + service_type
    if full_name.lower().endswith(suffix.lower()):
        return full_name[: -len(suffix)]
    return full_name


# -- the seam: zeroconf's thread -----------------------------------------------------


class ZeroconfThread:
    """The one bridge between trio and zeroconf's asyncio (docs/dnssd.md, "The seam").

    One thread runs an asyncio loop with the ``AsyncZeroconf`` on it (created
    there, so its sockets are made by that thread: a thread that joined a
    network namespace makes them in that namespace). From trio:

    - :meth:`run` runs a coroutine on that loop and waits for it without
      blocking trio (the result comes back through ``TrioToken.run_sync_soon``).
      A cancelled wait leaves the coroutine to finish on its loop: zeroconf's
      registry is never left half-changed, and what comes after it (a withdraw)
      is queued behind it (:meth:`_serial`);
    - :meth:`aclose` unregisters everything (goodbye packets), closes zeroconf,
      stops the loop and joins the thread, shielded and bounded.

    Nothing blocks the zeroconf thread on trio: its only calls to trio are
    ``run_sync_soon`` wake-ups (which never wait).
    """

    def __init__(self, interfaces: Sequence[str] | None = None) -> None:
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aiozc: AsyncZeroconf | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False
        self._start_error: BaseException | None = None
        # Zeroconf-thread state: touched only on its loop.
        self._locks: dict[str, asyncio.Lock] = {}
        self._registered: dict[str, ServiceInfo] = {}
        self._broadcasts: dict[str, asyncio.Future[Any]] = {}
        self._browsers: set[AsyncServiceBrowser] = set()

    @property
    def zeroconf(self) -> AsyncZeroconf:
        if self._aiozc is None:
            raise RendezvousError("zeroconf is not running")
        return self._aiozc

    async def start(self) -> None:
        """Start the thread and zeroconf on it; zeroconf's errors (a socket it
        cannot bind) are raised here."""
        self._token = trio.lowlevel.current_trio_token()
        started = trio.Event()
        token = self._token

        def ready() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(started.set)

        self._thread = threading.Thread(
            target=self._main, args=(ready,), name="portbroker-zeroconf", daemon=True
        )
        self._thread.start()
        with trio.CancelScope(shield=True):
            await started.wait()
        if self._start_error is not None:
            await trio.to_thread.run_sync(self._thread.join)
            error = self._start_error
            if isinstance(error, RendezvousError):
                raise error
            where = f" on {', '.join(self._interfaces)}" if self._interfaces else ""
            hint = " (is each an address of this host?)" if self._interfaces else ""
            raise RendezvousError(f"zeroconf could not start{where}: {error}{hint}") from error

    def _main(self, ready: Callable[[], None]) -> None:
        from zeroconf import InterfaceChoice
        from zeroconf.asyncio import AsyncZeroconf

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def create() -> AsyncZeroconf:
            # Inside the loop: zeroconf then uses it instead of starting a
            # loop thread of its own.
            if self._interfaces is None:
                return AsyncZeroconf(interfaces=InterfaceChoice.All)
            aiozc = AsyncZeroconf(interfaces=self._interfaces)
            # zeroconf skips an address it cannot bind (EADDRNOTAVAIL) with a
            # log line and runs deaf and mute: say so instead.
            if getattr(aiozc.zeroconf.engine, "_respond_sockets", None) == []:
                await aiozc.async_close()
                raise RendezvousError(
                    f"none of {', '.join(self._interfaces)} is an address of this host"
                )
            return aiozc

        try:
            self._aiozc = loop.run_until_complete(create())
        except BaseException as exc:  # noqa: BLE001 - reported to the trio side
            _close_sockets_of(exc)
            self._start_error = exc.with_traceback(None)
            loop.close()
            ready()
            return
        self._loop = loop
        ready()
        try:
            loop.run_forever()
        finally:
            # A close that timed out (or never came): zeroconf still gets closed.
            if not self._aiozc.zeroconf.done:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._aiozc.async_close())
            # Whatever is still pending (a resolve, a repeat announcement) is
            # cancelled and awaited, not destroyed with the loop.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def run(self, make: Callable[[AsyncZeroconf], Coroutine[Any, Any, T]]) -> T:
        """Run ``make(aiozc)`` on zeroconf's loop; its result or exception comes back here."""
        if self._closed or self._loop is None or self._token is None:
            raise RendezvousError("the rendezvous is closed")
        done = trio.Event()
        token = self._token
        aiozc = self.zeroconf

        def wake(_future: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(make(aiozc), self._loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.add_done_callback(_log_orphan)
            raise
        if future.cancelled():
            # The loop stopped under it (a close): not the caller's bug.
            raise RendezvousError("the rendezvous closed")
        return future.result()

    def post(self, fn: Callable[[], None]) -> None:
        """Call *fn* on zeroconf's loop, soon, without waiting (thread-safe)."""
        if self._loop is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop just closed
                self._loop.call_soon_threadsafe(fn)

    # Zeroconf-thread helpers (run on its loop, through run()).

    async def _serial(self, key: str, op: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Ops on one instance name in the order trio submitted them (asyncio
        locks are FIFO and run_coroutine_threadsafe starts tasks in order)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            return await op()

    async def apply(self, key: str, info: ServiceInfo | None) -> None:
        """Make zeroconf's record for *key* be *info* (None: withdrawn, with goodbyes)."""

        async def op() -> None:
            aiozc = self.zeroconf
            current = self._registered.get(key)
            # The announcements of the previous state stop first: zeroconf
            # repeats them (RFC 6762 §8.3) with the records it was given, so
            # left running they would send the old TXT after the new one, or
            # bring a withdrawn name back after its goodbye.
            self._stop_broadcast(key)
            if info is None:
                if current is not None:
                    del self._registered[key]
                    # RFC 6762 §10.1: records sent again with TTL 0.
                    await await_quietly(await aiozc.async_unregister_service(current))
                return
            if current is None:
                # Probing first (RFC 6762 §8.1): a name in use raises here.
                broadcast = await aiozc.async_register_service(info)
            else:
                broadcast = await aiozc.async_update_service(info)
            self._registered[key] = info
            self._keep_broadcast(key, broadcast)

        await self._serial(key, op)

    def _keep_broadcast(self, key: str, broadcast: Any) -> None:
        if isinstance(broadcast, asyncio.Future):
            self._broadcasts[key] = broadcast
            broadcast.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _stop_broadcast(self, key: str) -> None:
        broadcast = self._broadcasts.pop(key, None)
        if broadcast is not None:
            broadcast.cancel()

    async def _shutdown(self, aiozc: AsyncZeroconf) -> None:
        for key in list(self._broadcasts):
            self._stop_broadcast(key)
        for browser in list(self._browsers):
            with contextlib.suppress(Exception):
                await browser.async_cancel()
        self._browsers.clear()
        for key, info in list(self._registered.items()):
            del self._registered[key]
            with contextlib.suppress(Exception):
                await await_quietly(await aiozc.async_unregister_service(info))
        await aiozc.async_close()

    async def aclose(self) -> None:
        """Unregister everything, close zeroconf, stop the thread. Idempotent,
        shielded from cancellation, bounded by :data:`CLOSE_TIMEOUT`."""
        if self._closed or self._thread is None:
            self._closed = True
            return
        with trio.CancelScope(shield=True):
            if self._loop is not None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    try:
                        await self.run(self._shutdown)
                    except Exception:
                        logger.exception("zeroconf did not close cleanly")
                self._closed = True
                loop = self._loop
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(loop.stop)
            self._closed = True
            # Bounded too: a zeroconf thread stuck in a call never sees the
            # stop, and a daemon's shutdown must not wait for it forever (the
            # thread is a daemon thread: it dies with the process).
            thread = self._thread
            await trio.to_thread.run_sync(thread.join, CLOSE_TIMEOUT)
            if thread.is_alive():
                logger.warning(
                    "zeroconf's thread did not stop within %g s; left behind", CLOSE_TIMEOUT
                )


def shielded() -> trio.CancelScope:
    """A shield for a withdraw or a browser's end, bounded by :data:`CLOSE_TIMEOUT`:
    a withdraw waits behind what zeroconf's thread is doing, and a thread
    stuck in a call would otherwise hold its caller (a daemon's request,
    its shutdown) forever. A withdraw cut short is still queued
    (:meth:`Publication.withdraw`)."""
    return trio.move_on_after(CLOSE_TIMEOUT, shield=True)


def _close_sockets_of(error: BaseException) -> None:
    """Close the sockets zeroconf made before it failed (its create_sockets
    leaves the 0.0.0.0:5353 one open when joining an interface fails); they
    are only reachable from the traceback's frames."""
    tb = error.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


async def await_quietly(awaitable: Any) -> None:
    """Wait for a zeroconf broadcast; its failure is logged, not raised."""
    try:
        await awaitable
    except Exception:
        logger.debug("a zeroconf broadcast failed", exc_info=True)


def _background(awaitable: Any) -> None:
    """Announcements go on without the caller (RFC 6762 §8.3 repeats them)."""
    if isinstance(awaitable, asyncio.Future):
        awaitable.add_done_callback(lambda f: f.cancelled() or f.exception())


def _log_orphan(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.debug("an abandoned zeroconf call failed: %s", future.exception())


class _PeerTable:
    """A browser's peers, shared by zeroconf's thread (writer) and trio (reader).

    The zeroconf thread writes the latest state of each name (:meth:`put`);
    trio takes the names that changed since it last looked (:meth:`take`).
    Overflow policy: changes to one name coalesce (the latest wins, nothing
    queues behind it), so what waits for trio is at most one entry per name,
    and names are bounded by :data:`MAX_PEERS` (a new name past that is
    dropped and counted). At most one wake-up is pending in trio at a time,
    however many callbacks zeroconf fires.
    """

    def __init__(self, token: trio.lowlevel.TrioToken, limit: int = MAX_PEERS) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}
        self._dirty: set[str] = set()
        self._wake_pending = False
        self._token = token
        self._limit = limit
        self.changed = trio.Event()
        self.dropped = 0
        self.wakeups = 0  # run_sync_soon calls made (for the tests of the seam)
        self.closed = False

    def put(self, name: str, peer: Peer | None) -> None:
        """From any thread: *name* is now *peer* (None: gone)."""
        with self._lock:
            if peer is None:
                if self._peers.pop(name, None) is None and name not in self._dirty:
                    return
            else:
                if name not in self._peers and len(self._peers) >= self._limit:
                    self._drop()
                    return
                self._peers[name] = peer
            self._dirty.add(name)
            if self._wake_pending:
                return
            self._wake_pending = True
            self.wakeups += 1
        self._wake()

    def _drop(self) -> None:
        self.dropped += 1
        if self.dropped == 1:
            logger.warning("more than %d peers of one service type: ignoring new ones", self._limit)

    def admits(self, name: str, resolving: int) -> bool:
        """From zeroconf's thread: whether to resolve *name*, with *resolving*
        resolves in flight. A known peer always is; a new name only while both
        the table and the resolves in flight are under the limit, so that a
        LAN host announcing 10,000 names gets no 10,000 queries sent and no
        10,000 tasks (the name is dropped and counted instead)."""
        with self._lock:
            if name in self._peers:
                return True
            if len(self._peers) < self._limit and resolving < self._limit:
                return True
            self._drop()
            return False

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._wake_pending = True
        self._wake()

    def _wake(self) -> None:
        def wake() -> None:
            self.changed.set()

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(wake)

    def take(self) -> dict[str, Peer | None]:
        """In trio: the names changed since the last take, with their state now."""
        with self._lock:
            self.changed = trio.Event()
            self._wake_pending = False
            names, self._dirty = self._dirty, set()
            return {name: self._peers.get(name) for name in names}

    def snapshot(self) -> dict[str, Peer]:
        with self._lock:
            return dict(self._peers)

    def pending(self) -> int:
        with self._lock:
            return len(self._dirty)


# -- trio side ----------------------------------------------------------------------


class Publication:
    """One published service instance. :meth:`update` changes it, :meth:`withdraw` ends it.

    Updates are applied in order, one at a time; concurrent ones coalesce (the
    latest wins: a burst of address changes is one re-announcement).
    """

    def __init__(self, rendezvous: Rendezvous, advert: Advert) -> None:
        self._rv = rendezvous
        self._desired: Advert | None = advert
        self._version = 0
        self._applied = -1
        self._lock = trio.Lock()
        self.advert = advert
        self.withdrawn = False
        self.follower: trio.CancelScope | None = None

    @property
    def key(self) -> str:
        return self.advert.key

    async def _apply(self, advert: Advert | None) -> None:
        self._version += 1
        version = self._version
        self._desired = advert
        async with self._lock:
            if self._applied >= version:
                return  # a later state already went out with an earlier call
            target_version, target = self._version, self._desired
            info = None if target is None else _service_info(target)  # raises RendezvousError
            await self._rv.thread.apply_key(self.key, info)
            self._applied = target_version

    async def update(self, advert: Advert) -> None:
        """Publish *advert* instead (same service type and name)."""
        if self.withdrawn:
            raise RendezvousError(f"{self.advert.name!r} was withdrawn")
        if advert.key != self.key:
            raise RendezvousError("an update keeps the service type and instance name")
        advert = attrs.evolve(advert, revision=self.advert.revision + 1)
        self.advert = advert
        await self._apply(advert)

    async def update_lease(self, lease: Lease, *, state: Literal["up", "lost"] = "up") -> None:
        """Publish *lease*'s endpoints (Restored, ExternalAddressChanged) or ``state=lost``."""
        await self.update(
            attrs.evolve(
                self.advert,
                internal_address=lease.internal_address,
                internal_port=lease.internal_port,
                external_address=lease.external_address,
                external_port=lease.external_port,
                method=lease.method,
                state=state,
            )
        )

    async def mark_lost(self) -> None:
        """``Lost``: keep the internal endpoint, drop the external one, say ``state=lost``."""
        await self.update(attrs.evolve(self.advert, state="lost"))

    async def withdraw(self) -> None:
        """Unregister (goodbye packets, RFC 6762 §10.1). Idempotent; when
        cancelled, the withdraw still goes out, queued behind anything under way."""
        if self.withdrawn:
            return
        self.withdrawn = True
        if self.follower is not None:
            self.follower.cancel()
        self._rv._forget(self)
        try:
            await self._apply(None)
        except trio.Cancelled:
            self._rv.thread.submit_withdraw(self.key)
            raise
        except RendezvousError:
            pass  # the rendezvous closed: its close unregistered everything


class Browser:
    """Peers of one service type: :meth:`snapshot`, or ``async for change in browser``."""

    def __init__(self, rendezvous: Rendezvous, service_type: str, table: _PeerTable) -> None:
        self._rv = rendezvous
        self.service_type = service_type
        self._table = table
        self._view: dict[str, Peer] = {}
        self.handle: AsyncServiceBrowser | None = None

    @property
    def dropped(self) -> int:
        """New names ignored because the table was full (:data:`MAX_PEERS`)."""
        return self._table.dropped

    def snapshot(self) -> dict[str, Peer]:
        """Every peer seen now, by instance name (what zeroconf has resolved)."""
        return self._table.snapshot()

    def __aiter__(self) -> AsyncIterator[PeerChange]:
        return self.changes()

    async def changes(self) -> AsyncIterator[PeerChange]:
        """Changes from the caller's view to the peers now; one consumer at a time.

        Changes to one name coalesce: a peer that changed twice between two
        reads is one ``updated`` with its last state; one that came and went
        is no change at all.
        """
        while True:
            await self._table.changed.wait()
            if self._table.closed:
                return
            for name, peer in sorted(self._table.take().items()):
                old = self._view.get(name)
                if peer is None:
                    if old is not None:
                        del self._view[name]
                        yield PeerChange("removed", name, None)
                elif old is None:
                    self._view[name] = peer
                    yield PeerChange("added", name, peer)
                elif old != peer:
                    self._view[name] = peer
                    yield PeerChange("updated", name, peer)

    async def aclose(self) -> None:
        self._table.close()
        handle, self.handle = self.handle, None
        if handle is not None:
            with contextlib.suppress(RendezvousError):
                await self._rv.thread.run(lambda _zc: self._rv.thread.cancel_browser(handle))


class _Thread(ZeroconfThread):
    """The seam, with the operations :class:`Rendezvous` needs (all run on its loop)."""

    async def apply_key(self, key: str, info: ServiceInfo | None) -> None:
        try:
            await self.run(lambda _zc: self.apply(key, info))
        except RendezvousError:
            raise
        except Exception as exc:
            from zeroconf import NonUniqueNameException

            if isinstance(exc, NonUniqueNameException):
                raise RendezvousError(
                    f"{key!r} is already in use on the network: choose another instance name"
                ) from None
            raise RendezvousError(f"zeroconf refused {key!r}: {type(exc).__name__}: {exc}") from exc

    def submit_withdraw(self, key: str) -> None:
        """A withdraw nobody waits for (its caller was cancelled): queued in order."""
        loop = self._loop
        if loop is None or self._closed:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self.apply(key, None), loop).add_done_callback(
                _log_orphan
            )

    async def start_browser(self, service_type: str, table: _PeerTable) -> AsyncServiceBrowser:
        from zeroconf import ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

        aiozc = self.zeroconf
        # Resolves in flight per name, coalesced: a flood of Updated callbacks
        # for one name is one resolve now and at most one after it. Each
        # resolve has its own marker, so one that a Removed overtook (or that
        # a newer Added replaced) writes nothing.
        resolving: dict[str, list[bool]] = {}

        async def resolve(full: str, again: list[bool]) -> None:
            settled = False
            try:
                while resolving.get(full) is again:
                    again[0] = False
                    info = AsyncServiceInfo(service_type, full)
                    found = await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS)
                    if resolving.get(full) is not again:
                        return  # removed meanwhile
                    if found and not table.closed:
                        table.put(_instance(full, service_type), _peer_of(info, service_type))
                    if again[0]:
                        continue
                    if settled:
                        return
                    # RFC 6762 §10.2: a record replaced with the cache-flush
                    # bit stays in the cache for one more second, so the read
                    # above may have taken the old TXT; read once more after.
                    await asyncio.sleep(CACHE_FLUSH_DELAY)
                    settled = True
            finally:
                if resolving.get(full) is again:
                    del resolving[full]

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            del zeroconf
            if state_change is ServiceStateChange.Removed:
                resolving.pop(name, None)
                table.put(_instance(name, service_type), None)
            elif name in resolving:
                resolving[name][0] = True  # once more when the one in flight ends
            elif table.admits(_instance(name, service_type), len(resolving)):
                resolving[name] = again = [False]
                _background(asyncio.ensure_future(resolve(name, again)))

        browser = AsyncServiceBrowser(aiozc.zeroconf, service_type, handlers=[on_change])
        self._browsers.add(browser)
        return browser

    async def cancel_browser(self, browser: AsyncServiceBrowser) -> None:
        self._browsers.discard(browser)
        await browser.async_cancel()


def _peer_of(info: Any, service_type: str) -> Peer:
    return peer_from_txt(
        _instance(info.name, service_type),
        service_type,
        info.server,
        info.parsed_scoped_addresses(),
        info.port,
        info.decoded_properties,
    )


def _service_info(advert: Advert) -> ServiceInfo:
    from zeroconf import Error as ZeroconfError
    from zeroconf import ServiceInfo

    try:
        return ServiceInfo(
            advert.service_type,
            f"{advert.name}.{advert.service_type}",
            port=advert.internal_port,
            properties=advert.txt(),
            server=advert.server(),
            parsed_addresses=[str(advert.internal_address)],
        )
    except (ZeroconfError, ValueError, TypeError) as exc:  # BadTypeInNameException...
        raise RendezvousError(f"zeroconf refused {advert.name!r}: {exc}") from None


class Rendezvous:
    """Publications and browsers over one :class:`ZeroconfThread` (:func:`open_rendezvous`)."""

    def __init__(self, thread: _Thread, nursery: trio.Nursery) -> None:
        self.thread = thread
        self._nursery = nursery
        self._publications: dict[str, Publication] = {}
        self._browsers: set[Browser] = set()

    @property
    def publications(self) -> tuple[Publication, ...]:
        return tuple(self._publications.values())

    def _forget(self, publication: Publication) -> None:
        if self._publications.get(publication.key) is publication:
            del self._publications[publication.key]

    async def publish_advert(self, advert: Advert) -> Publication:
        """Publish *advert* as it is; the caller updates and withdraws it.

        Raises:
            RendezvousError: the name is published here already or in use on
                the network (RFC 6762 §9 probing), or zeroconf refused it.
        """
        if advert.key in self._publications:
            raise RendezvousError(f"{advert.name!r} ({advert.service_type}) is published already")
        advert.txt()  # its size is checked before anything is sent
        publication = Publication(self, advert)
        self._publications[advert.key] = publication
        try:
            await publication._apply(advert)
        except BaseException:
            with shielded():
                await publication.withdraw()
            raise
        return publication

    async def publish(
        self,
        mapping: BrokerMapping,
        service_type: str,
        name: str,
        *,
        txt: Mapping[str, str] | None = None,
        host: str | None = None,
    ) -> Publication:
        """Publish *mapping* and keep the record true to its events (module docstring).

        The service type's protocol must be the mapping's. The publication is
        withdrawn when the mapping is released or fails, on
        :meth:`Publication.withdraw`, or when the rendezvous closes.
        """
        lease = mapping.lease
        if lease is None:
            raise RendezvousError("the mapping has no lease yet: publish it once granted")
        advert = advert_for(lease, service_type, name, extra=txt, host=host)
        events = mapping.events()  # before the first await: no event is missed
        try:
            publication = await self.publish_advert(advert)
        except BaseException:
            events.close()  # nobody will read it
            raise
        scope = trio.CancelScope()
        publication.follower = scope
        self._nursery.start_soon(self._follow, publication, events, scope)
        return publication

    async def _follow(
        self,
        publication: Publication,
        events: trio.MemoryReceiveChannel[Any],
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            async with events:
                async for event in events:
                    try:
                        if isinstance(event, Restored | ExternalAddressChanged | Acquired):
                            await publication.update_lease(event.lease)
                        elif isinstance(event, Renewed):
                            old = publication.advert
                            lease = event.lease
                            if (old.external_address, old.external_port, old.state) != (
                                lease.external_address,
                                lease.external_port,
                                "up",
                            ):
                                await publication.update_lease(lease)
                        elif isinstance(event, Lost):
                            await publication.mark_lost()
                        elif isinstance(event, Released | Failed):
                            break
                    except RendezvousError as exc:
                        logger.warning("%s: could not update: %s", publication.advert.name, exc)
        if not publication.withdrawn:
            publication.follower = None
            with shielded():
                await publication.withdraw()

    @contextlib.asynccontextmanager
    async def browse(self, service_type: str) -> AsyncIterator[Browser]:
        """Browse *service_type* on the LAN while the block runs."""
        service_type = check_service_type(service_type)
        token = trio.lowlevel.current_trio_token()
        table = _PeerTable(token)
        browser = Browser(self, service_type, table)
        browser.handle = await self.thread.run(
            lambda _zc: self.thread.start_browser(service_type, table)
        )
        self._browsers.add(browser)
        try:
            yield browser
        finally:
            self._browsers.discard(browser)
            with shielded():
                await browser.aclose()

    async def aclose(self) -> None:
        for browser in list(self._browsers):
            browser._table.close()
        for publication in list(self._publications.values()):
            publication.withdrawn = True
            if publication.follower is not None:
                publication.follower.cancel()
        self._publications.clear()
        await self.thread.aclose()  # unregisters every record (goodbyes) and joins


@contextlib.asynccontextmanager
async def open_rendezvous(interfaces: Sequence[str] | None = None) -> AsyncIterator[Rendezvous]:
    """zeroconf on *interfaces* (addresses; None: every interface) while the block runs.

    Leaving the block withdraws every publication (goodbye packets) and stops
    zeroconf's thread, also when cancelled.
    """
    if interfaces is not None:
        for text in interfaces:
            try:
                ipaddress.ip_address(text)
            except ValueError:
                raise RendezvousError(
                    f"interface {text!r} is not an IP address (give the addresses"
                    " to publish on, for example '192.168.1.10')"
                ) from None
    thread = _Thread(interfaces)
    await thread.start()
    try:
        async with trio.open_nursery() as nursery:
            rendezvous = Rendezvous(thread, nursery)
            try:
                yield rendezvous
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await rendezvous.aclose()
    finally:
        await thread.aclose()
