"""Decoders fed arbitrary bytes raise only MalformedMessage.

Two engines: hypothesis (arbitrary and structured inputs) and a mutation
fuzzer seeded with every real capture (bit flips, byte overwrites, truncation,
extension, splicing). The default run feeds tens of thousands of inputs; the
``fuzz`` marker feeds a million or more (``pytest -m fuzz``; the count comes
from PORTBROKER_FUZZ_COUNT).

Whatever a decoder accepts must also re-encode, and decode again to the same
object: a decoder must never build a value the encoder cannot write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portbroker.errors import LinkError, MalformedMessage, NoAnswer
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.transport import Transport, natpmp_key, pcp_key
from portbroker.wire import natpmp, pcp, ssdp
from tests import strategies as s
from tests.realdata import load_exchanges, load_ndpi, realdata, ssdp_replies


def _pcp_request(data: bytes) -> None:
    message = pcp.decode_request(data)
    assert pcp.decode_request(pcp.encode_request(message)) == message


def _pcp_response(data: bytes) -> None:
    message = pcp.decode_response(data)
    assert pcp.decode_response(pcp.encode_response(message)) == message


def _natpmp_request(data: bytes) -> None:
    message = natpmp.decode_request(data)
    assert natpmp.decode_request(natpmp.encode_request(message)) == message


def _natpmp_response(data: bytes) -> None:
    message = natpmp.decode_response(data)
    assert natpmp.decode_response(natpmp.encode_response(message)) == message


def _ssdp(data: bytes) -> None:
    message = ssdp.decode(data)
    # Touch every derived field: none may raise.
    _ = (message.usn, message.max_age, message.boot_id, message.config_id, message.uuid)
    _ = message.search_port


def _msearch(data: bytes) -> None:
    ssdp.decode_msearch(data)


DECODERS: dict[str, Callable[[bytes], None]] = {
    "pcp.decode_request": _pcp_request,
    "pcp.decode_response": _pcp_response,
    "natpmp.decode_request": _natpmp_request,
    "natpmp.decode_response": _natpmp_response,
    "ssdp.decode": _ssdp,
    "ssdp.decode_msearch": _msearch,
}


def feed(data: bytes) -> int:
    """Run *data* through every decoder; return how many accepted it."""
    accepted = 0
    for name, decoder in DECODERS.items():
        try:
            decoder(data)
        except MalformedMessage:
            continue
        except Exception as exc:
            raise AssertionError(f"{name} raised {exc!r} on {data.hex()}") from exc
        accepted += 1
    return accepted


def seeds() -> list[bytes]:
    out: list[bytes] = []
    for exchange in load_exchanges():
        out.append(exchange.request)
        if exchange.response:
            out.append(exchange.response)
    out.extend(payload for _, payload in load_ndpi())
    out.append(bytes.fromhex(realdata("pcp_natpmp", "tailscale_pcp_map_response.hex").read_text()))
    out.extend(raw for _, raw in ssdp_replies())
    out.append(ssdp.encode_msearch(ssdp.ST_IGD_V2))
    # A MAP request carrying every option type, so option parsing gets mutated.
    every_option = pcp.PcpRequest(
        pcp.Opcode.MAP,
        7200,
        "192.168.1.100",
        pcp.MapData(bytes(range(1, 13)), 17, 12345, 12345),
        (
            pcp.ThirdParty("192.168.1.101"),
            pcp.PreferFailure(),
            pcp.Filter(120, 80, "198.51.100.0"),
            pcp.UnknownOption(0x90, b"\x01\x02\x03\x04\x05"),
        ),
    )
    out.append(pcp.encode_request(every_option))
    return out


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(8)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # overwrite a byte with an interesting value
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 2, 0x7F, 0x80, 0x81, 0xFF, 10, 13, 58))
        elif op == 2 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 3:  # extend
            buf += bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 3, 4, 8, 40))))
        elif op == 4 and buf:  # delete a slice
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randrange(1, 9)]
        elif op == 5:  # splice with another seed
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            buf = buf[: rng.randrange(len(buf) + 1)] + bytearray(other[cut:])
        elif op == 6 and len(buf) >= 4:  # set a 16-bit length-like field
            i = rng.randrange(len(buf) - 1)
            buf[i : i + 2] = rng.choice((0, 4, 16, 20, 0xFFFF, len(buf))).to_bytes(2, "big")
        elif op == 7 and buf:  # duplicate a chunk
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i : i + rng.randrange(1, 25)]
    return bytes(buf)


def mutations(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    pool = seeds()
    yield from pool
    for _ in range(count - len(pool)):
        yield mutate(rng, rng.choice(pool), pool)


def test_every_seed_is_accepted_by_some_decoder() -> None:
    # Guards the fuzzer: if the seeds stopped decoding, mutations of them would
    # only exercise the first length check.
    rejected = {seed.hex() for seed in seeds() if feed(seed) == 0}
    # Captured requests that are invalid on purpose: only a server's request
    # decoder sees them, and it must refuse them.
    assert rejected == {
        "0005",  # NAT-PMP opcode 5
        "0100",  # NAT-PMP version 1
        "0001000013",  # NAT-PMP map cut to 5 bytes
        "030100000000025800000000000000000000ffffc0a84d02"
        "0102030405060708090a0b0c110000001388138800000000000000000000ffff00000000",  # PCP v3
        "020500000000000000000000000000000000ffffc0a84d02",  # PCP opcode 5
        "020100000000025800000000000000000000ffffc0a84d020102030405060708090a0b0c",  # short
        # libpcp's mock answers NAT-PMP with a 2-byte echo and a 12-byte PCP reply.
        "0080",
        "02810001138a138a00000000",
    }


def test_mutation_fuzzer_default_run() -> None:
    accepted = sum(feed(data) > 0 for data in mutations(30_000, seed=6887))
    # The mutations must keep reaching past the first checks.
    assert accepted > 3_000


@pytest.mark.fuzz
def test_mutation_fuzzer_long_run() -> None:
    count = int(os.environ.get("PORTBROKER_FUZZ_COUNT", "1000000"))
    seed = int(os.environ.get("PORTBROKER_FUZZ_SEED", "6886"))
    accepted = sum(feed(data) > 0 for data in mutations(count, seed=seed))
    print(f"\nfuzz: {count} inputs (seed {seed}), {accepted} accepted by at least one decoder")
    assert accepted > count // 20


@settings(max_examples=3_000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1200))
def test_arbitrary_bytes(data: bytes) -> None:
    feed(data)


@settings(max_examples=2_000)
@given(
    st.one_of(s.pcp_requests().map(pcp.encode_request), s.pcp_responses().map(pcp.encode_response)),
    st.data(),
)
def test_structured_pcp_with_one_byte_changed(raw: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(raw) - 1))
    value = data.draw(st.integers(0, 255))
    feed(raw[:position] + bytes((value,)) + raw[position + 1 :])
    cut = data.draw(st.integers(0, len(raw)))
    feed(raw[:cut])


# -- the transport fed arbitrary datagrams and socket errors ------------------


def _transport_survives(datagrams: list[bytes], errnos: list[int]) -> None:
    """A waiting request ends with a response, NoAnswer or LinkError, whatever
    arrives; the receive loop lives on and answers the next request."""

    async def main() -> None:
        gateway = FakeGateway(pcp_enabled=False, natpmp_enabled=False)
        link = gateway.memory_link()
        transport = Transport(link, lambda *_: None)
        announce = pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, "192.168.1.100")
        nat = natpmp.ExternalAddressRequest()
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.run)

            async def ask(payload: bytes, key: tuple[object, ...]) -> None:
                with contextlib.suppress(NoAnswer, LinkError, ConnectionRefusedError):
                    await transport.request(payload, key, [0.25, 0.5])

            async with trio.open_nursery() as asks:
                asks.start_soon(ask, pcp.encode_request(announce), pcp_key(announce))
                asks.start_soon(ask, natpmp.encode_request(nat), natpmp_key(nat))
                await trio.sleep(0.01)
                for data in datagrams:
                    link.put(data, ("127.0.0.1", 5351))
                for code in errnos:
                    link.fail_receive(OSError(code, errno.errorcode.get(code, "?")))
            gateway.natpmp_enabled = True
            await trio.sleep(1.5)  # past the refusal memory
            response = await transport.request(
                natpmp.encode_request(nat), natpmp_key(nat), [0.25, 0.5]
            )
            assert isinstance(response, natpmp.ExternalAddressResponse)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(seeds())), max_size=6),
    st.lists(st.sampled_from([1, 9, 22, 99, 101, 105, 111, 113]), max_size=3),
)
def test_the_transport_survives_arbitrary_datagrams_and_socket_errors(
    datagrams: list[bytes], errnos: list[int]
) -> None:
    _transport_survives(datagrams, errnos)
