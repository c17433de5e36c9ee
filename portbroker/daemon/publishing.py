"""The daemon's DNS-SD publications: ``publish`` / ``unpublish`` (docs/daemon-protocol.md).

A client publishes one of its user's mappings as a DNS-SD service
(:mod:`portbroker.rendezvous`). A publication belongs to the mapping, not to
the connection: it lives until ``unpublish``, or until the mapping ends
(unmap, the grace period after its apps left, a refusal for good), and
follows the mapping's events meanwhile (docs/dnssd.md). zeroconf is started
only at the first publish, on the interface of the mapping's internal address
(or the daemon's ``publish_interfaces``), so a daemon nobody asks to publish
never sends mDNS. Publications are not persisted: after a restart, apps
publish again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final, Literal

import attrs
import trio

from portbroker.daemon.ownership import Entry, Key
from portbroker.daemon.protocol import ErrorCode, ProtocolError, Request
from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    Failed,
    Lost,
    MappingEvent,
    Renewed,
    Restored,
    State,
)
from portbroker.rendezvous import (
    Publication,
    Rendezvous,
    RendezvousError,
    advert_for,
    check_instance_name,
    check_service_type,
    open_rendezvous,
    shielded,
)
from portbroker.types import Lease

__all__ = ["MAX_PUBLICATIONS", "Publishing"]

logger = logging.getLogger("portbroker.daemon")

# Publications one user may have at once (the daemon's --max-publications).
# Each is a few records re-announced on every change: a bound keeps one user
# from flooding the LAN's multicast through the daemon.
MAX_PUBLICATIONS: Final = 16
# A mapping in these states is over for good (Failed) or going (release):
# nothing to publish.
_ENDED: Final = (State.FAILED, State.RELEASED, State.RELEASING)


@attrs.define(eq=False)
class _Published:
    owner_uid: int
    key: Key
    publication: Publication | None  # None while zeroconf probes for its name

    def describe(self, entry_id: str) -> dict[str, Any]:
        assert self.publication is not None
        advert = self.publication.advert
        return {
            "mapping": entry_id,
            "type": advert.service_type,
            "name": advert.name,
            "txt": advert.txt(),
        }


class Publishing:
    """The daemon's publications, keyed by mapping and by DNS-SD name."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        max_per_uid: int = MAX_PUBLICATIONS,
        interfaces: tuple[str, ...] | None = None,
        opener: Callable[[list[str]], contextlib.AbstractAsyncContextManager[Rendezvous]]
        | None = None,
    ) -> None:
        if max_per_uid < 1:
            raise ValueError("max_publications must be at least 1")
        self._nursery = nursery
        self._max = max_per_uid
        self._interfaces = interfaces
        self._open = opener or open_rendezvous
        self._by_key: dict[Key, dict[str, _Published]] = {}
        self._by_name: dict[str, _Published] = {}
        self._rendezvous: dict[tuple[str, ...], Rendezvous] = {}
        self._starting: dict[tuple[str, ...], trio.Event] = {}

    def count(self, uid: int) -> int:
        return sum(1 for p in self._by_name.values() if p.owner_uid == uid)

    def of(self, key: Key) -> list[_Published]:
        return list(self._by_key.get(key, {}).values())

    async def publish(
        self, uid: int, entry: Entry, handle: Any, request: Request
    ) -> dict[str, Any]:
        """The ``publish`` op for *entry* (already checked to be *uid*'s)."""
        service_type, name = _names(request)
        txt = request.get("txt", dict, {})
        if not all(isinstance(v, str) for v in txt.values()):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'txt' values must be strings")
        lease: Lease | None = handle.lease
        if handle.state in _ENDED:
            # A Failed mapping keeps its last lease: published, it would
            # advertise an external endpoint the gateway no longer holds.
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                f"{entry.id} has ended ({handle.state.value}): map it again, then publish",
            )
        if lease is None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{entry.id} is not granted yet: publish it once mapped"
            )
        try:
            advert = advert_for(
                lease,
                service_type,
                name,
                state="lost" if handle.state is State.LOST else "up",
                extra=txt,
            )
            advert.txt()  # the size, before anything is sent
        except RendezvousError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if advert.key in self._by_name:
            raise ProtocolError(
                ErrorCode.CONFLICT, f"{name!r} ({advert.service_type}) is published already"
            )
        if self.count(uid) >= self._max:
            raise ProtocolError(
                ErrorCode.TOO_MANY_PUBLICATIONS,
                f"at most {self._max} publications per user; unpublish one first",
            )
        interfaces = self._interfaces or (str(lease.internal_address),)
        # Reserved before the first await: a concurrent publish of the same
        # name, or one over the limit, is refused, not raced.
        placeholder = _Published(uid, entry.key, None)
        self._by_name[advert.key] = placeholder
        try:
            rendezvous = await self._rendezvous_for(interfaces)
            publication = await rendezvous.publish_advert(advert)
        except RendezvousError as exc:
            del self._by_name[advert.key]
            code = ErrorCode.CONFLICT if "already in use" in str(exc) else ErrorCode.PUBLISH_FAILED
            raise ProtocolError(code, str(exc)) from None
        except BaseException:
            del self._by_name[advert.key]
            raise
        placeholder.publication = publication
        if self._by_name.get(advert.key) is not placeholder:
            # Its mapping ended while zeroconf probed (gone() dropped it).
            with shielded():
                await publication.withdraw()
            raise ProtocolError(ErrorCode.NOT_FOUND, f"{entry.id} ended before it was published")
        self._by_key.setdefault(entry.key, {})[advert.key] = placeholder
        # Events while zeroconf probed went to no publication (changed() skips
        # placeholders): catch up with the mapping as it is now.
        now: Literal["up", "lost"] = "lost" if handle.state is State.LOST else "up"
        if handle.lease is not None and (handle.lease, now) != (lease, advert.state):
            self._nursery.start_soon(
                self._quietly, publication.update_lease(handle.lease, state=now)
            )
        logger.info("uid %d: published %s as %r (%s)", uid, entry.id, name, advert.service_type)
        return {"published": placeholder.describe(entry.id)}

    async def unpublish(self, entry: Entry, request: Request) -> dict[str, Any]:
        service_type, name = _names(request)
        full = f"{name}.{service_type}".lower()
        published = self._by_key.get(entry.key, {}).get(full)
        if published is None:
            raise ProtocolError(
                ErrorCode.NOT_FOUND, f"{entry.id} is not published as {name!r} ({service_type})"
            )
        self._forget(full)
        if published.publication is not None:
            with shielded():
                await published.publication.withdraw()
        return {"unpublished": published.describe(entry.id)}

    def changed(self, key: Key, event: MappingEvent, lease: Lease | None) -> None:
        """A mapping event: its publications follow (module docstring of rendezvous)."""
        if isinstance(event, Failed):
            # Also a publish still probing (a placeholder): it finds itself gone.
            self.gone(key)
            return
        for published in self.of(key):
            publication = published.publication
            if publication is None:
                continue
            if isinstance(event, Lost):
                self._nursery.start_soon(self._quietly, publication.mark_lost())
            elif (
                isinstance(event, Restored | ExternalAddressChanged | Renewed | Acquired) and lease
            ):
                # Acquired: a mapping taken over from the state file after a
                # restart (published while it was restoring, from the file's
                # lease) may have been granted another external port.
                advert = publication.advert
                if isinstance(event, Renewed | Acquired) and (
                    advert.external_address,
                    advert.external_port,
                    advert.state,
                ) == (lease.external_address, lease.external_port, "up"):
                    continue  # nothing to tell
                self._nursery.start_soon(self._quietly, publication.update_lease(lease))

    def gone(self, key: Key) -> None:
        """The mapping *key* ended: withdraw its publications (goodbye packets)."""
        for full in list(self._by_key.get(key, {})):
            published = self._forget(full)
            if published is not None and published.publication is not None:
                self._nursery.start_soon(self._quietly, published.publication.withdraw())
        # A publish still probing for it finds its placeholder gone.
        for full, published in list(self._by_name.items()):
            if published.key == key and published.publication is None:
                del self._by_name[full]

    def _forget(self, full: str) -> _Published | None:
        published = self._by_name.pop(full, None)
        if published is not None:
            by_key = self._by_key.get(published.key, {})
            by_key.pop(full, None)
            if not by_key:
                self._by_key.pop(published.key, None)
        return published

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except RendezvousError as exc:
            logger.warning("a publication could not be updated: %s", exc)

    async def _rendezvous_for(self, interfaces: tuple[str, ...]) -> Rendezvous:
        while interfaces in self._starting:
            await self._starting[interfaces].wait()
        if interfaces not in self._rendezvous:
            self._starting[interfaces] = started = trio.Event()
            try:
                self._rendezvous[interfaces] = await self._nursery.start(self._hold, interfaces)
                logger.info("zeroconf publishing on %s", ", ".join(interfaces))
            finally:
                del self._starting[interfaces]
                started.set()
        return self._rendezvous[interfaces]

    async def _hold(
        self, interfaces: tuple[str, ...], *, task_status: trio.TaskStatus[Rendezvous]
    ) -> None:
        """zeroconf on *interfaces* until the daemon stops (then every record is withdrawn)."""
        try:
            async with self._open(list(interfaces)) as rendezvous:
                task_status.started(rendezvous)
                await trio.sleep_forever()
        finally:
            self._rendezvous.pop(interfaces, None)


def _names(request: Request) -> tuple[str, str]:
    service_type = request.get("type", str)
    name = request.get("name", str)
    if service_type is None or name is None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "'type' (a service type such as '_http._tcp') and 'name' are required",
        )
    try:
        return check_service_type(service_type), check_instance_name(name)
    except RendezvousError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
