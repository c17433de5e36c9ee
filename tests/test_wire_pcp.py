"""PCP codec: RFC layouts, protocols.md §5 vectors, and real captures."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portbroker.errors import MalformedMessage, UnsupportedOpcode, UnsupportedVersion
from portbroker.wire import pcp
from portbroker.wire.pcp import (
    ErrorClass,
    Filter,
    MapData,
    Opcode,
    PcpRequest,
    PcpResponse,
    PeerData,
    PreferFailure,
    ResultCode,
    ThirdParty,
    UnknownOption,
)
from tests import strategies as s
from tests.realdata import load_exchanges, realdata

NONCE = bytes(range(1, 13))
CLIENT = IPv4Address("192.168.1.100")


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# protocols.md §5.1
MAP_REQUEST = h(
    "02 01 00 00  00 00 1c 20  00 00 00 00 00 00 00 00 00 00 ff ff c0 a8 01 64"
    "01 02 03 04 05 06 07 08 09 0a 0b 0c  11 00 00 00  ca 6c  ca 6c"
    "00 00 00 00 00 00 00 00 00 00 ff ff 00 00 00 00"
)
# protocols.md §5.2
MAP_RESPONSE = h(
    "02 81 00 00  00 00 0e 10  00 00 03 e8  00 00 00 00 00 00 00 00 00 00 00 00"
    "01 02 03 04 05 06 07 08 09 0a 0b 0c  11 00 00 00  ca 6c  c3 50"
    "00 00 00 00 00 00 00 00 00 00 ff ff cb 00 71 07"
)


def udp_map(**changes: object) -> PcpRequest:
    fields: dict[str, object] = {
        "opcode": Opcode.MAP,
        "lifetime": 7200,
        "client_address": CLIENT,
        "data": MapData(NONCE, 17, 51820, 51820, pcp.NO_PREFERENCE_V4),
    }
    fields.update(changes)
    return PcpRequest(**fields)  # type: ignore[arg-type]


class TestVectors:
    def test_map_request_encodes_to_the_rfc_layout(self) -> None:
        assert pcp.encode_request(udp_map()) == MAP_REQUEST

    def test_map_request_with_prefer_failure_appends_four_bytes(self) -> None:
        encoded = pcp.encode_request(udp_map(options=(PreferFailure(),)))
        assert encoded == MAP_REQUEST + h("02 00 00 00")

    def test_third_party_option_is_twenty_bytes(self) -> None:
        encoded = pcp.encode_request(udp_map(options=(ThirdParty("192.168.1.101"),)))
        assert encoded[60:] == h("01 00 00 10 00000000000000000000ffffc0a80165")

    def test_delete_vector(self) -> None:
        delete = udp_map(lifetime=0, data=MapData(NONCE, 17, 51820, 0))
        assert pcp.encode_request(delete) == h(
            "0201000000000000 00000000000000000000ffffc0a80164 0102030405060708090a0b0c"
            " 11000000 ca6c 0000 00000000000000000000ffff00000000"
        )

    def test_announce_request_is_the_bare_header(self) -> None:
        request = PcpRequest(Opcode.ANNOUNCE, 0, CLIENT)
        assert pcp.encode_request(request) == h(
            "02 00 00 00 00 00 00 00" + "00" * 10 + "ffff c0a80164"
        )

    def test_unsolicited_announce_response_vector(self) -> None:
        response = pcp.decode_response(h("02 80 00 00 00 00 00 00 00 00 00 05" + "00" * 12))
        assert (response.opcode, response.result_code, response.epoch) == (
            Opcode.ANNOUNCE,
            ResultCode.SUCCESS,
            5,
        )
        assert response.data is None
        assert response.options == ()

    def test_map_response_decodes_every_field(self) -> None:
        response = pcp.decode_response(MAP_RESPONSE)
        assert response == PcpResponse(
            Opcode.MAP,
            ResultCode.SUCCESS,
            3600,
            1000,
            MapData(NONCE, 17, 51820, 50000, IPv4Address("203.0.113.7")),
        )
        assert pcp.encode_response(response) == MAP_RESPONSE

    def test_error_response_keeps_the_suggestion_and_its_lifetime(self) -> None:
        raw = bytearray(MAP_RESPONSE)
        raw[3:8] = h("08 00 00 00 1e")
        raw[42:60] = h("ca6c 00000000000000000000ffff00000000")
        response = pcp.decode_response(bytes(raw))
        assert response.result_code is ResultCode.NO_RESOURCES
        assert response.lifetime == 30
        assert response.data == MapData(NONCE, 17, 51820, 51820, pcp.NO_PREFERENCE_V4)


def test_tailscale_capture_decodes_to_the_documented_mapping() -> None:
    raw = bytes.fromhex(realdata("pcp_natpmp", "tailscale_pcp_map_response.hex").read_text())
    response = pcp.decode_response(raw)
    assert response.lifetime == 7200
    assert response.epoch == 170989
    assert isinstance(response.data, MapData)
    assert response.data.protocol == 17
    assert response.data.internal_port == 1234
    assert response.data.external_port == 1234
    assert response.data.external_address == IPv4Address("135.180.175.246")


class TestAddresses:
    def test_ipv4_travels_as_v4_mapped(self) -> None:
        assert pcp.encode_request(udp_map())[8:24] == h("00" * 10 + "ffff c0a80164")

    def test_the_two_no_preference_forms_stay_distinct(self) -> None:
        v4 = pcp.encode_request(udp_map(data=MapData(NONCE, 17, 1, 0, pcp.NO_PREFERENCE_V4)))
        v6 = pcp.encode_request(udp_map(data=MapData(NONCE, 17, 1, 0, pcp.NO_PREFERENCE_V6)))
        assert v4[44:60] == h("00" * 10 + "ffff 00000000")
        assert v6[44:60] == bytes(16)
        for raw, want in ((v4, IPv4Address("0.0.0.0")), (v6, IPv6Address("::"))):
            data = pcp.decode_request(raw).data
            assert data is not None
            assert data.external_address == want
            assert type(data.external_address) is type(want)

    def test_v4_mapped_ipv6_input_is_normalised_to_ipv4(self) -> None:
        data = MapData(NONCE, 6, 80, 0, IPv6Address("::ffff:10.1.2.3"))
        assert data.external_address == IPv4Address("10.1.2.3")

    def test_ipv4_compatible_address_is_not_mistaken_for_ipv4(self) -> None:
        # RFC 6887 §5: all 96 leading bits decide; ::a.b.c.d is IPv6.
        raw = bytearray(MAP_RESPONSE)
        raw[44:60] = h("00" * 12 + "cb007107")
        data = pcp.decode_response(bytes(raw)).data
        assert data is not None
        assert data.external_address == IPv6Address("::203.0.113.7")

    def test_no_preference_follows_the_family(self) -> None:
        assert pcp.no_preference(IPv4Address("1.2.3.4")) == IPv4Address("0.0.0.0")
        assert pcp.no_preference(IPv6Address("2001:db8::1")) == IPv6Address("::")


class TestResultCodes:
    @pytest.mark.parametrize(
        "code", [ResultCode.NETWORK_FAILURE, ResultCode.NO_RESOURCES, ResultCode.USER_EX_QUOTA]
    )
    def test_short_lifetime_errors(self, code: ResultCode) -> None:
        assert code.error_class is ErrorClass.SHORT
        assert code.is_short_lifetime

    @pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6, 9, 12, 13])
    def test_long_lifetime_errors(self, code: int) -> None:
        assert ResultCode(code).error_class is ErrorClass.LONG

    def test_cannot_provide_external_depends_on_the_cause(self) -> None:
        assert ResultCode.CANNOT_PROVIDE_EXTERNAL.error_class is ErrorClass.DEPENDS

    def test_success_is_no_error(self) -> None:
        assert ResultCode.SUCCESS.error_class is ErrorClass.NONE

    def test_unknown_code_decodes_and_counts_as_long(self) -> None:
        raw = bytearray(MAP_RESPONSE)
        raw[3] = 200
        response = pcp.decode_response(bytes(raw))
        assert response.result_code == 200
        assert response.result_code.name == "UNKNOWN_200"
        assert response.result_code.error_class is ErrorClass.LONG


class TestResponseRules:
    def test_r_bit_clear_is_rejected(self) -> None:
        with pytest.raises(MalformedMessage, match="R bit"):
            pcp.decode_response(MAP_REQUEST)

    @pytest.mark.parametrize("length", [4, 20, 23, 61, 62, 63])
    def test_bad_lengths_are_rejected(self, length: int) -> None:
        with pytest.raises(MalformedMessage):
            pcp.decode_response((MAP_RESPONSE + bytes(8))[:length])

    def test_longer_than_1100_is_rejected(self) -> None:
        big = MAP_RESPONSE + (h("80 00 03 f8") + bytes(1016))  # one optional option
        assert len(big) == 1080
        pcp.decode_response(big)
        with pytest.raises(MalformedMessage, match="1100"):
            pcp.decode_response(MAP_RESPONSE + h("80 00 04 10") + bytes(1040))

    def test_success_map_without_its_data_is_rejected(self) -> None:
        with pytest.raises(MalformedMessage, match="opcode data"):
            pcp.decode_response(MAP_RESPONSE[:36])

    def test_natpmp_reply_is_recognised_before_the_length_rules(self) -> None:
        # protocols.md §5.4: a NAT-PMP gateway's answer to the §5.1 MAP.
        response = pcp.decode_response(h("00 81 00 01 00 01 e2 40"))
        assert response.is_natpmp
        assert response.version == 0
        assert response.result_code is ResultCode.UNSUPP_VERSION
        assert response.opcode is Opcode.MAP
        assert response.epoch == 123456

    def test_natpmp_reply_in_the_rfc_figure_form_is_accepted(self) -> None:
        # RFC 6886 §3.5 as published draws OP = 0 (erratum 3618 says 128).
        response = pcp.decode_response(h("00 00 00 01 00 00 00 07"))
        assert response.is_natpmp
        assert response.epoch == 7

    def test_natpmp_reply_with_another_result_is_rejected(self) -> None:
        with pytest.raises(MalformedMessage, match="result 2"):
            pcp.decode_response(h("00 81 00 02 00 00 00 07"))

    def test_version_one_unsupp_version_reply_names_the_version(self) -> None:
        raw = bytearray(MAP_RESPONSE)
        raw[0], raw[3] = 1, 1
        response = pcp.decode_response(bytes(raw))
        assert (response.version, response.result_code) == (1, ResultCode.UNSUPP_VERSION)
        assert pcp.encode_response(response) == bytes(raw)

    def test_other_version_without_unsupp_version_is_rejected(self) -> None:
        raw = bytearray(MAP_RESPONSE)
        raw[0] = 3
        with pytest.raises(MalformedMessage, match="version 3"):
            pcp.decode_response(bytes(raw))


class TestOptions:
    def test_padding_is_not_counted_in_the_length(self) -> None:
        option = UnknownOption(0x90, b"\x01\x02\x03\x04\x05")
        encoded = pcp.encode_request(udp_map(options=(option,)))
        assert encoded[60:] == h("90 00 00 05 0102030405 000000")
        assert pcp.decode_request(encoded).options == (option,)

    def test_mandatory_and_optional_ranges(self) -> None:
        assert UnknownOption(0x7F).code.is_mandatory
        assert not UnknownOption(0x80).code.is_mandatory

    def test_filter_layout(self) -> None:
        option = Filter(120, 443, "198.51.100.0")
        encoded = pcp.encode_request(udp_map(options=(option,)))
        assert encoded[60:] == h("03 00 00 14 00 78 01bb 00000000000000000000ffffc6336400")
        assert pcp.decode_request(encoded).options == (option,)

    @pytest.mark.parametrize(
        ("option", "reason"),
        [
            (h("01 00 00 04 00000000"), "THIRD_PARTY must carry 16"),
            (h("02 00 00 04 00000000"), "PREFER_FAILURE must carry 0"),
            (h("03 00 00 10") + bytes(16), "FILTER must carry 20"),
            (h("90 00 00 09 0000000000000000"), "claims 9 bytes"),
        ],
    )
    def test_bad_options_are_malformed_option(self, option: bytes, reason: str) -> None:
        raw = MAP_REQUEST + option
        raw += bytes(-len(raw) % 4)
        with pytest.raises(MalformedMessage, match=reason) as info:
            pcp.decode_request(raw)
        assert info.value.result_code == ResultCode.MALFORMED_OPTION

    def test_filter_prefix_over_128_is_malformed(self) -> None:
        raw = MAP_REQUEST + h("03 00 00 14 00 81 0000") + bytes(16)
        with pytest.raises(MalformedMessage, match="prefix length 129"):
            pcp.decode_request(raw)

    def test_unknown_option_cannot_shadow_a_typed_one(self) -> None:
        with pytest.raises(ValueError, match="own type"):
            UnknownOption(1, bytes(16))

    def test_encoding_past_1100_bytes_is_refused(self) -> None:
        filters = tuple(Filter(128, 1, "10.0.0.1") for _ in range(44))
        with pytest.raises(ValueError, match="1100"):
            pcp.encode_request(udp_map(options=filters))


class TestRequestDecoding:
    def test_version_other_than_two_is_unsupported_version(self) -> None:
        with pytest.raises(UnsupportedVersion) as info:
            pcp.decode_request(b"\x01" + MAP_REQUEST[1:])
        assert info.value.version == 1
        assert info.value.result_code == ResultCode.UNSUPP_VERSION

    def test_unknown_opcode_is_unsupported_opcode(self) -> None:
        with pytest.raises(UnsupportedOpcode) as info:
            pcp.decode_request(h("02 05 0000 00000000") + bytes(16))
        assert info.value.opcode == 5
        assert info.value.result_code == ResultCode.UNSUPP_OPCODE

    def test_r_bit_set_is_dropped_without_answer(self) -> None:
        with pytest.raises(MalformedMessage) as info:
            pcp.decode_request(MAP_RESPONSE)
        assert info.value.result_code is None

    def test_truncated_map_is_malformed_request(self) -> None:
        with pytest.raises(MalformedMessage) as info:
            pcp.decode_request(MAP_REQUEST[:36])
        assert info.value.result_code == ResultCode.MALFORMED_REQUEST

    def test_peer_request_round_trip(self) -> None:
        peer = PcpRequest(
            Opcode.PEER,
            600,
            CLIENT,
            PeerData(NONCE, 6, 5011, 5011, "0.0.0.0", 80, "11.22.33.1"),
        )
        assert pcp.decode_request(pcp.encode_request(peer)) == peer


class TestValueChecks:
    def test_nonce_must_be_twelve_bytes(self) -> None:
        with pytest.raises(ValueError, match="12 bytes"):
            MapData(b"short", 17, 1, 1)

    def test_port_range_is_checked(self) -> None:
        with pytest.raises(ValueError, match=r"0\.\.65535"):
            MapData(NONCE, 17, 70000, 1)

    def test_opcode_data_must_match_the_opcode(self) -> None:
        with pytest.raises(ValueError, match="needs MapData"):
            PcpRequest(Opcode.MAP, 1, CLIENT)
        with pytest.raises(ValueError, match="no opcode data"):
            PcpRequest(Opcode.ANNOUNCE, 0, CLIENT, MapData(NONCE, 17, 1, 1))

    def test_bad_address_text_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="not an IP address"):
            PcpRequest(Opcode.ANNOUNCE, 0, "192.168.1.300")


# -- real captures -----------------------------------------------------------

PCP_EXCHANGES = [e for e in load_exchanges() if e.name.startswith("pcp")]

# Requests in the captures that are deliberately not valid PCP.
BAD_REQUESTS: dict[str, type[MalformedMessage]] = {
    "miniupnpd-2.3.1:pcp_v3_unsupp_version": UnsupportedVersion,
    "miniupnpd-2.3.1:pcp_v2_unknown_opcode": UnsupportedOpcode,
    "miniupnpd-2.3.1:pcp_v2_map_short": MalformedMessage,
}


@pytest.mark.parametrize("exchange", PCP_EXCHANGES, ids=lambda e: e.id)
def test_captured_requests_re_encode_byte_for_byte(exchange: object) -> None:
    from tests.realdata import Exchange

    assert isinstance(exchange, Exchange)
    bad = BAD_REQUESTS.get(exchange.id)
    if bad is not None:
        with pytest.raises(bad):
            pcp.decode_request(exchange.request)
        return
    request = pcp.decode_request(exchange.request)
    assert pcp.encode_request(request) == exchange.request


@pytest.mark.parametrize(
    "exchange", [e for e in PCP_EXCHANGES if e.response is not None], ids=lambda e: e.id
)
def test_captured_responses_re_encode_byte_for_byte(exchange: object) -> None:
    from tests.realdata import Exchange

    assert isinstance(exchange, Exchange)
    assert exchange.response is not None
    response = pcp.decode_response(exchange.response)
    assert pcp.encode_response(response) == exchange.response


def _exchange(name: str) -> tuple[PcpRequest | None, PcpResponse]:
    for e in load_exchanges():
        if e.id == name:
            assert e.response is not None
            try:
                request: PcpRequest | None = pcp.decode_request(e.request)
            except MalformedMessage:
                request = None
            return request, pcp.decode_response(e.response)
    raise LookupError(name)


MINI = "miniupnpd-2.3.1:"
EXT = IPv4Address("11.22.33.44")


class TestMiniupnpdCaptures:
    def test_announce_reply_carries_the_epoch(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_announce")
        assert (response.opcode, response.result_code, response.lifetime, response.epoch) == (
            Opcode.ANNOUNCE,
            ResultCode.SUCCESS,
            0,
            0x2D2,
        )

    def test_map_success_assigns_the_external_endpoint(self) -> None:
        request, response = _exchange(MINI + "pcp_v2_map_udp")
        assert request is not None
        assert request.client_address == IPv4Address("192.168.77.2")
        assert response.data == MapData(NONCE, 17, 5000, 5000, EXT)
        assert (response.lifetime, response.epoch) == (7200, 0x2D2)

    def test_map_with_port_zero_suggestion_gets_the_internal_port(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_map_tcp_anyext")
        assert response.data == MapData(NONCE, 6, 5010, 5010, EXT)
        assert response.lifetime == 600

    def test_peer_response_copies_the_remote_peer(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_peer_tcp")
        assert response.data == PeerData(NONCE, 6, 5011, 5011, EXT, 80, IPv4Address("11.22.33.1"))

    def test_delete_success_has_lifetime_zero(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_map_delete")
        assert (response.result_code, response.lifetime) == (ResultCode.SUCCESS, 0)

    def test_address_mismatch(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_map_addr_mismatch")
        assert response.result_code is ResultCode.ADDRESS_MISMATCH
        assert response.lifetime == 0  # miniupnpd: long errors with lifetime 0

    def test_delete_with_another_nonce_is_not_authorized(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_map_delete_wrong_nonce")
        assert response.result_code is ResultCode.NOT_AUTHORIZED
        assert response.data is not None
        assert response.data.nonce == bytes(12)

    def test_unsupported_version_reply_names_version_two(self) -> None:
        _, response = _exchange(MINI + "pcp_v3_unsupp_version")
        assert (response.version, response.result_code) == (2, ResultCode.UNSUPP_VERSION)

    def test_echoed_prefer_failure_option(self) -> None:
        request, response = _exchange(MINI + "pcp_v2_map_prefer_failure_opt")
        assert request is not None
        assert request.options == (PreferFailure(),)
        assert response.options == (PreferFailure(),)
        assert response.result_code is ResultCode.SUCCESS

    def test_unknown_mandatory_option_gets_unsupp_option(self) -> None:
        request, response = _exchange(MINI + "pcp_v2_map_unknown_mandatory_opt")
        assert request is not None
        assert request.options == (UnknownOption(0x7F),)
        assert response.result_code is ResultCode.UNSUPP_OPTION

    def test_unknown_opcode_reply_is_header_only(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_unknown_opcode")
        assert response.opcode == 5
        assert response.result_code is ResultCode.UNSUPP_OPCODE
        assert response.data is None

    def test_cut_short_error_reply_keeps_its_bytes(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_map_short")
        assert response.result_code is ResultCode.MALFORMED_REQUEST
        assert response.data is None
        assert response.opaque == NONCE

    def test_all_protocols_all_ports_is_malformed_for_miniupnpd(self) -> None:
        request, response = _exchange(MINI + "pcp_v2_map_all_protocols_port0")
        assert request is not None
        assert request.data is not None
        assert (request.data.protocol, request.data.internal_port) == (0, 0)
        assert response.result_code is ResultCode.MALFORMED_REQUEST

    def test_port_below_1024_denied_by_acl(self) -> None:
        _, response = _exchange(MINI + "pcp_v2_map_tcp_port_lt1024_denied")
        assert response.result_code is ResultCode.NOT_AUTHORIZED


class TestOtherServers:
    def test_natpmp_only_server_answers_pcp_announce_with_8_bytes(self) -> None:
        _, response = _exchange("koalatux-natpmp:pcp_v2_announce_to_natpmp_server")
        assert response.is_natpmp
        assert response.opcode is Opcode.ANNOUNCE
        assert response.epoch == 2

    def test_libpcp_mock_map_reply(self) -> None:
        _, response = _exchange("libpcp:pcp_v2_map_req")
        assert response.data == MapData(NONCE, 17, 5000, 5000, EXT)
        assert response.epoch == 0


# -- round trips -------------------------------------------------------------


@given(s.pcp_requests())
def test_every_request_round_trips(request: PcpRequest) -> None:
    assert pcp.decode_request(pcp.encode_request(request)) == request


@given(s.pcp_responses())
def test_every_response_round_trips(response: PcpResponse) -> None:
    assert pcp.decode_response(pcp.encode_response(response)) == response


@given(st.lists(s.pcp_options(), max_size=6))
def test_every_option_list_round_trips(options: list[pcp.Option]) -> None:
    request = udp_map(options=options)
    assert pcp.decode_request(pcp.encode_request(request)).options == tuple(options)
