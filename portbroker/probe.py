"""Which method does the gateway speak? All of them are asked at once.

Two shapes of the same race:

- :func:`probe_all` asks every method and waits for every answer (bounded by
  the probe timeout), for reports such as ``portbroker probe``;
- :func:`create_by_preference` makes a mapping with the most preferred method
  that works, deciding as early as the answers allow: the most preferred
  method's own create request doubles as its probe (a PCP MAP answered is PCP
  chosen; a closed port or a version-0 reply rules it out in one round trip),
  while the others are probed beside it. Only the chosen method ever creates
  a mapping, so no method leaves a stray one behind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from portbroker.errors import (
    LinkError,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    NoMethodAvailable,
    PortBrokerError,
)
from portbroker.methods import Method
from portbroker.transport import budget
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome, ProbeReport

__all__ = ["HEAD_START", "NoMethodAvailable", "create_by_preference", "probe_all", "report_json"]

# Seconds the most preferred method's own request runs alone (see create_by_preference).
HEAD_START = 0.02

logger = logging.getLogger("portbroker")


def _failure(method: Method, gateway: IPAddress, exc: Exception) -> str:
    """One method's failure in words: what its outcome's ``error`` says.

    Whatever a method raises is that method's failure, never the caller's: a
    socket error becomes a :class:`LinkError` sentence, and anything else not
    a :class:`PortBrokerError` is a bug, logged here once with its traceback.
    """
    if isinstance(exc, MethodUnavailable):
        return exc.reason
    if isinstance(exc, PortBrokerError):
        return str(exc)
    if isinstance(exc, OSError):
        return str(LinkError("reach", str(gateway), exc))
    logger.error("internal error in method %s (gateway %s)", method.name, gateway, exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc}"


async def _probe_one(method: Method, probe_timeout: float, gateway: IPAddress) -> ProbeOutcome:
    with trio.move_on_after(probe_timeout) as scope, budget(scope):
        try:
            return await method.probe()
        except Exception as exc:  # noqa: BLE001 - a method's failure, bug or not, is its outcome
            return ProbeOutcome(
                method.name,
                False,
                error=_failure(method, gateway, exc),
                silent=isinstance(exc, NoAnswer),
            )
    return ProbeOutcome(
        method.name, False, error=f"no answer within {probe_timeout:g} s", silent=True
    )


async def probe_all(
    gateway: IPAddress, methods: Sequence[Method], probe_timeout: float
) -> ProbeReport:
    """Probe every method concurrently; select the first available in order.

    Never raises for a method's failure: each one is that method's outcome.
    """
    outcomes: dict[str, ProbeOutcome] = {}

    async def run(method: Method) -> None:
        outcomes[method.name] = await _probe_one(method, probe_timeout, gateway)

    async with trio.open_nursery() as nursery:
        for method in methods:
            nursery.start_soon(run, method)
    ordered = tuple(outcomes[m.name] for m in methods)
    selected = next((o.method for o in ordered if o.available), None)
    return ProbeReport(gateway, selected, ordered)


@attrs.define
class _Slot:
    done: trio.Event = attrs.Factory(trio.Event)
    outcome: ProbeOutcome | None = None
    lease: Lease | None = None
    error: MappingError | None = None


async def create_by_preference(
    gateway: IPAddress,
    methods: Sequence[Method],
    request: MappingRequest,
    probe_timeout: float,
    *,
    known_unavailable: Mapping[str, str] | None = None,
) -> tuple[Lease, ProbeReport]:
    """Create *request* with the most preferred method that works.

    *known_unavailable* names methods already ruled out (cached probe results)
    and why; they are not asked again. A method that answered its probe but
    then fails the create with MethodUnavailable (a useless grant, a result
    code that refuses this client: docs/result-codes.md) is ruled out too, and
    the next one is tried. Any other exception from a method is that method's
    outcome ("internal error: ..."), never the caller's ExceptionGroup.

    Raises:
        MappingError: the chosen method refused the request.
        NoMethodAvailable: none of the methods works with this gateway.
        NoAnswer: the chosen method answered its probe but not the request.
    """
    skipped = dict(known_unavailable or {})
    candidates = [m for m in methods if m.name not in skipped]
    if not candidates:
        raise NoMethodAvailable(
            [ProbeOutcome(m.name, False, error=skipped[m.name]) for m in methods]
        )
    first, *others = candidates
    slots = {m.name: _Slot() for m in candidates}
    started = trio.current_time()

    async def create_first() -> None:
        slot = slots[first.name]
        with trio.move_on_after(probe_timeout) as scope, budget(scope):
            try:
                slot.lease = await first.create(request, None)
                slot.outcome = ProbeOutcome(
                    first.name,
                    True,
                    trio.current_time() - started,
                    slot.lease.external_address,
                    epoch=slot.lease.epoch,
                )
            except MappingError as exc:
                # It answered: the method is there, the request was refused.
                slot.error = exc
                slot.outcome = ProbeOutcome(first.name, True, error=exc.reason)
            except Exception as exc:  # noqa: BLE001 - see _failure
                slot.outcome = ProbeOutcome(
                    first.name,
                    False,
                    error=_failure(first, gateway, exc),
                    silent=isinstance(exc, NoAnswer),
                )
        if scope.cancelled_caught:
            slot.outcome = ProbeOutcome(
                first.name, False, error=f"no answer within {probe_timeout:g} s", silent=True
            )
        slot.done.set()

    async def probe(method: Method) -> None:
        # A head start for the preferred method's request: if it answers
        # within it, the other probes never load the gateway (miniupnpd is
        # single-threaded, and an SSDP search or NAT-PMP request queued beside
        # the MAP delays its answer); if it fails at once (ICMP, version 0),
        # they start at once.
        with trio.move_on_after(HEAD_START):
            await slots[first.name].done.wait()
        if slots[first.name].lease is not None:
            return
        slot = slots[method.name]
        slot.outcome = await _probe_one(method, probe_timeout, gateway)
        slot.done.set()

    chosen: Method | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(create_first)
        for method in others:
            nursery.start_soon(probe, method)
        for method in candidates:
            slot = slots[method.name]
            await slot.done.wait()
            assert slot.outcome is not None
            if slot.outcome.available:
                chosen = method
                break
        # Decided (or nothing works): the remaining probes have nothing to add.
        nursery.cancel_scope.cancel()

    def report(selected: Method | None) -> ProbeReport:
        # Methods never asked (the decision came first) are left out, not failed.
        outcomes = [o for m in candidates if (o := slots[m.name].outcome) is not None]
        outcomes += [ProbeOutcome(name, False, error=why) for name, why in skipped.items()]
        return ProbeReport(gateway, selected.name if selected else None, tuple(outcomes))

    first_slot = slots[first.name]
    if chosen is first:
        if first_slot.error is not None:
            raise first_slot.error
        assert first_slot.lease is not None
        return first_slot.lease, report(first)
    # It answered its probe moments ago, so a create gets a few probe timeouts.
    create_budget = max(4 * probe_timeout, 8.0) if math.isfinite(probe_timeout) else math.inf
    for method in others:
        slot = slots[method.name]
        if slot.outcome is None:
            # Cut short when another method was chosen; that one failed since.
            slot.outcome = await _probe_one(method, probe_timeout, gateway)
        if not slot.outcome.available:
            continue
        try:
            with trio.fail_after(create_budget) as scope, budget(scope):
                lease = await method.create(request, None)
        except trio.TooSlowError:
            raise NoAnswer(
                f"{method.name}: no answer to the mapping request", method=method.name
            ) from None
        except NoAnswer as exc:
            # Silent after answering its probe. The request may have created
            # the mapping: the caller cleans up (Method.abandon) before it
            # lets another method try, so nothing is duplicated.
            exc.method = method.name
            raise
        except MappingError:
            raise  # refused: about this request, another method would meet it too
        except Exception as exc:  # noqa: BLE001 - see _failure
            slot.outcome = ProbeOutcome(method.name, False, error=_failure(method, gateway, exc))
            continue
        return lease, report(method)
    raise NoMethodAvailable(report(None).outcomes)


def report_json(report: ProbeReport) -> dict[str, Any]:
    """A probe report as the CLI's ``probe --json`` and the daemon's ``probe`` print it."""
    return {
        "gateway": str(report.gateway),
        "selected": report.selected,
        "methods": {
            o.method: {
                "available": o.available,
                "rtt_ms": None if o.rtt is None else round(o.rtt * 1000, 3),
                "external_address": None if o.external_address is None else str(o.external_address),
                "epoch": o.epoch,
                "error": o.error,
                # docs/double-nat.md: None when no address was reported.
                "public": None if o.reachability is None else o.reachability.public,
                "reachability": None if o.reachability is None else o.reachability.reason,
            }
            for o in report.outcomes
        },
    }
