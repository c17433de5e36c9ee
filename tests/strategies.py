"""hypothesis strategies for every wire message type."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from hypothesis import strategies as st

from portbroker.wire import natpmp, pcp
from portbroker.wire._fields import IPAddress

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)


def addresses() -> st.SearchStrategy[IPAddress]:
    v4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
    v6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1)).map(
        lambda a: a.ipv4_mapped or a  # the codec normalises these to IPv4
    )
    return st.one_of(v4, v6, st.sampled_from([pcp.NO_PREFERENCE_V4, pcp.NO_PREFERENCE_V6]))


def pcp_options() -> st.SearchStrategy[pcp.Option]:
    return st.one_of(
        st.builds(pcp.ThirdParty, addresses()),
        st.just(pcp.PreferFailure()),
        st.builds(pcp.Filter, st.integers(0, 128), u16, addresses()),
        st.builds(
            pcp.UnknownOption,
            u8.filter(lambda c: c not in (1, 2, 3)),
            st.binary(max_size=40),
        ),
    )


def map_data() -> st.SearchStrategy[pcp.MapData]:
    return st.builds(pcp.MapData, st.binary(min_size=12, max_size=12), u8, u16, u16, addresses())


def peer_data() -> st.SearchStrategy[pcp.PeerData]:
    return st.builds(
        pcp.PeerData,
        st.binary(min_size=12, max_size=12),
        u8,
        u16,
        u16,
        addresses(),
        u16,
        addresses(),
    )


def _opcode_and_data() -> st.SearchStrategy[tuple[pcp.Opcode, pcp.OpcodeData | None]]:
    return st.one_of(
        st.tuples(st.just(pcp.Opcode.ANNOUNCE), st.none()),
        st.tuples(st.just(pcp.Opcode.MAP), map_data()),
        st.tuples(st.just(pcp.Opcode.PEER), peer_data()),
    )


@st.composite
def pcp_requests(draw: st.DrawFn) -> pcp.PcpRequest:
    opcode, data = draw(_opcode_and_data())
    options = draw(st.lists(pcp_options(), max_size=4))
    return pcp.PcpRequest(opcode, draw(u32), draw(addresses()), data, options)


@st.composite
def pcp_responses(draw: st.DrawFn) -> pcp.PcpResponse:
    kind = draw(st.sampled_from(["normal", "cut-short", "unknown-opcode", "natpmp", "v1"]))
    result = pcp.ResultCode(draw(u8))
    lifetime, epoch = draw(u32), draw(u32)
    if kind == "normal":
        opcode, data = draw(_opcode_and_data())
        options = draw(st.lists(pcp_options(), max_size=4))
        reserved = draw(st.binary(min_size=12, max_size=12))
        return pcp.PcpResponse(opcode, result, lifetime, epoch, data, options, 2, reserved)
    if kind == "cut-short":
        opcode = draw(st.sampled_from([pcp.Opcode.MAP, pcp.Opcode.PEER]))
        size = pcp.MAP_DATA_SIZE if opcode == pcp.Opcode.MAP else pcp.PEER_DATA_SIZE
        words = draw(st.integers(0, size // 4 - 1))
        error = pcp.ResultCode(draw(st.integers(1, 255)))
        return pcp.PcpResponse(
            opcode,
            error,
            lifetime,
            epoch,
            opaque=draw(st.binary(min_size=4 * words, max_size=4 * words)),
        )
    if kind == "unknown-opcode":
        opcode = pcp.Opcode(draw(st.integers(3, 127)))
        words = draw(st.integers(0, 20))
        body = draw(st.binary(min_size=4 * words, max_size=4 * words))
        return pcp.PcpResponse(opcode, result, lifetime, epoch, opaque=body)
    unsupp = pcp.ResultCode.UNSUPP_VERSION
    opcode = pcp.Opcode(draw(st.integers(0, 127)))
    if kind == "natpmp":
        return pcp.PcpResponse(opcode, unsupp, 0, epoch, version=0)
    version = draw(st.integers(1, 255).filter(lambda v: v != 2))
    words = draw(st.integers(0, 10))
    return pcp.PcpResponse(
        opcode,
        unsupp,
        lifetime,
        epoch,
        version=version,
        reserved=draw(st.binary(min_size=12, max_size=12)),
        opaque=draw(st.binary(min_size=4 * words, max_size=4 * words)),
    )


def natpmp_requests() -> st.SearchStrategy[natpmp.NatPmpRequest]:
    return st.one_of(
        st.just(natpmp.ExternalAddressRequest()),
        st.builds(
            natpmp.MapRequest,
            st.sampled_from([natpmp.Opcode.MAP_UDP, natpmp.Opcode.MAP_TCP]),
            u16,
            u16,
            u32,
        ),
    )


def natpmp_responses() -> st.SearchStrategy[natpmp.NatPmpResponse]:
    results = u16.map(natpmp.ResultCode)
    return st.one_of(
        st.builds(
            natpmp.ExternalAddressResponse,
            results,
            u32,
            st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
        ),
        st.builds(
            natpmp.MapResponse,
            st.sampled_from([natpmp.Opcode.MAP_UDP, natpmp.Opcode.MAP_TCP]),
            results,
            u32,
            u16,
            u16,
            u32,
        ),
        st.builds(
            natpmp.ShortResponse,
            st.integers(0, 127).map(natpmp.Opcode),
            st.integers(1, 0xFFFF).map(natpmp.ResultCode),
            u32,
        ),
    )
