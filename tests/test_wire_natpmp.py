"""NAT-PMP codec: RFC 6886 layouts, protocols.md §5 vectors, and real captures."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given

from portbroker.errors import MalformedMessage, UnsupportedOpcode, UnsupportedVersion
from portbroker.wire import natpmp
from portbroker.wire.natpmp import (
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    Opcode,
    ResultCode,
    ShortResponse,
)
from tests import strategies as s
from tests.realdata import Exchange, load_exchanges, load_ndpi


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


class TestVectors:
    def test_map_request(self) -> None:
        request = MapRequest(Opcode.MAP_UDP, 8080, 8080, 7200)
        assert natpmp.encode_request(request) == h("00 01 00 00 1f 90 1f 90 00 00 1c 20")
        assert request.protocol == "udp"

    def test_delete_and_delete_all(self) -> None:
        delete = MapRequest(Opcode.MAP_UDP, 8080, 0, 0)
        assert natpmp.encode_request(delete) == h("00 01 00 00 1f 90 00 00 00 00 00 00")
        delete_all = MapRequest(Opcode.MAP_UDP, 0, 0, 0)
        assert natpmp.encode_request(delete_all) == bytes((0, 1)) + bytes(10)

    def test_map_response(self) -> None:
        raw = h("00 81 00 00 00 01 e2 40 1f 90 c3 51 00 00 1c 20")
        response = natpmp.decode_response(raw)
        assert response == MapResponse(
            Opcode.MAP_UDP, ResultCode.SUCCESS, 123456, 8080, 50001, 7200
        )
        assert natpmp.encode_response(response) == raw

    def test_delete_acknowledgement(self) -> None:
        response = natpmp.decode_response(h("00 81 00 00 00 01 e2 44 1f 90 00 00 00 00 00 00"))
        assert isinstance(response, MapResponse)
        assert (response.external_port, response.lifetime, response.epoch) == (0, 0, 123460)

    def test_external_address(self) -> None:
        assert natpmp.encode_request(ExternalAddressRequest()) == h("00 00")
        response = natpmp.decode_response(h("00 80 00 00 00 01 e2 40 cb 00 71 07"))
        assert response == ExternalAddressResponse(
            ResultCode.SUCCESS, 123456, IPv4Address("203.0.113.7")
        )

    def test_result_code_is_sixteen_bits(self) -> None:
        response = natpmp.decode_response(h("00 81 01 02 00 00 00 01 1f 90 00 00 00 00 00 00"))
        assert response.result_code == 0x0102
        assert response.result_code.name == "UNKNOWN_258"


class TestDecodingRules:
    def test_short_form_error(self) -> None:
        response = natpmp.decode_response(h("00 85 00 05 00 00 02 cd"))
        assert response == ShortResponse(Opcode(5), ResultCode.UNSUPPORTED_OPCODE, 0x2CD)

    def test_unsupported_version_in_the_published_figure_form(self) -> None:
        # RFC 6886 §3.5 as published (OP = 0); erratum 3618 corrected it to 128.
        response = natpmp.decode_response(h("00 00 00 01 00 00 00 09"))
        assert response == ShortResponse(Opcode.EXTERNAL_ADDRESS, ResultCode.UNSUPPORTED_VERSION, 9)

    def test_request_is_not_a_response(self) -> None:
        with pytest.raises(MalformedMessage, match="response bit"):
            natpmp.decode_response(h("00 01 00 00 1f 90 1f 90 00 00 1c 20"))

    def test_pcp_version_is_not_natpmp(self) -> None:
        with pytest.raises(MalformedMessage, match="version 2"):
            natpmp.decode_response(h("02 81 00 01 13 8a 13 8a 00 00 00 00"))

    @pytest.mark.parametrize(
        "raw", ["0080", "00800000000000", "00800000000000010b16", "0081000000000000 1f90"]
    )
    def test_wrong_lengths(self, raw: str) -> None:
        with pytest.raises(MalformedMessage):
            natpmp.decode_response(h(raw))

    def test_success_never_comes_in_the_short_form(self) -> None:
        with pytest.raises(MalformedMessage):
            natpmp.decode_response(h("00 81 00 00 00 00 00 01"))

    def test_request_decoder_reports_version_and_opcode(self) -> None:
        with pytest.raises(UnsupportedVersion) as version:
            natpmp.decode_request(h("01 00"))
        assert version.value.version == 1
        assert version.value.result_code == ResultCode.UNSUPPORTED_VERSION
        with pytest.raises(UnsupportedOpcode) as opcode:
            natpmp.decode_request(h("00 05"))
        assert opcode.value.opcode == 5
        assert opcode.value.result_code == ResultCode.UNSUPPORTED_OPCODE

    def test_request_decoder_ignores_responses_and_short_maps(self) -> None:
        for raw in ("00 80", "00 01 00 00 13", "00 00 00"):
            with pytest.raises(MalformedMessage) as info:
                natpmp.decode_request(h(raw))
            assert info.value.result_code is None

    def test_map_request_opcode_is_checked(self) -> None:
        with pytest.raises(ValueError, match="MAP_UDP or MAP_TCP"):
            MapRequest(Opcode.EXTERNAL_ADDRESS, 1, 1, 1)


# -- real captures -----------------------------------------------------------

NATPMP_EXCHANGES = [e for e in load_exchanges() if e.name.startswith("natpmp")]


@pytest.mark.parametrize("exchange", NATPMP_EXCHANGES, ids=lambda e: e.id)
def test_captured_requests_re_encode_or_are_refused(exchange: Exchange) -> None:
    name = exchange.name
    if "bad_opcode" in name:
        with pytest.raises(UnsupportedOpcode):
            natpmp.decode_request(exchange.request)
    elif "v1_unsupported_version" in name:
        with pytest.raises(UnsupportedVersion):
            natpmp.decode_request(exchange.request)
    elif "short_map" in name:
        with pytest.raises(MalformedMessage):
            natpmp.decode_request(exchange.request)
    else:
        request = natpmp.decode_request(exchange.request)
        assert natpmp.encode_request(request) == exchange.request


# libpcp's mock is a PCP-only server: its answers to NAT-PMP are not NAT-PMP.
LIBPCP_NON_ANSWERS = {"libpcp:natpmp_v0_extaddr_req", "libpcp:natpmp_v0_map_udp_req"}


@pytest.mark.parametrize(
    "exchange", [e for e in NATPMP_EXCHANGES if e.response], ids=lambda e: e.id
)
def test_captured_responses(exchange: Exchange) -> None:
    assert exchange.response is not None
    if exchange.id in LIBPCP_NON_ANSWERS:
        with pytest.raises(MalformedMessage):
            natpmp.decode_response(exchange.response)
        return
    response = natpmp.decode_response(exchange.response)
    assert natpmp.encode_response(response) == exchange.response
    if len(exchange.request) == 12:
        request = natpmp.decode_request(exchange.request)
        assert isinstance(request, MapRequest)
        assert isinstance(response, MapResponse)
        assert response.opcode == request.opcode
        assert response.internal_port == request.internal_port


def _response(name: str) -> natpmp.NatPmpResponse:
    exchange = next(e for e in load_exchanges() if e.id == name)
    assert exchange.response is not None
    return natpmp.decode_response(exchange.response)


class TestCapturedFields:
    def test_miniupnpd_external_address(self) -> None:
        assert _response("miniupnpd-2.3.1:natpmp_v0_extaddr") == ExternalAddressResponse(
            ResultCode.SUCCESS, 0x2CC, IPv4Address("11.22.33.44")
        )

    def test_miniupnpd_denial_keeps_the_ports_and_lifetime(self) -> None:
        response = _response("miniupnpd-2.3.1:natpmp_v0_map_tcp_port_lt1024_denied_by_acl")
        assert response == MapResponse(
            Opcode.MAP_TCP, ResultCode.NOT_AUTHORIZED, 0x2D5, 22, 22, 3600
        )

    def test_koalatux_maps_a_low_port_elsewhere(self) -> None:
        response = _response("koalatux-natpmp:natpmp_v0_map_tcp_port22_below_range")
        assert isinstance(response, MapResponse)
        assert (response.result_code, response.external_port) == (ResultCode.SUCCESS, 2022)

    def test_koalatux_answers_version_one_with_8_bytes(self) -> None:
        assert _response("koalatux-natpmp:natpmp_v1_unsupported_version") == ShortResponse(
            Opcode.EXTERNAL_ADDRESS, ResultCode.UNSUPPORTED_VERSION, 2
        )


def test_ndpi_capture_of_a_real_router() -> None:
    payloads = load_ndpi()
    responses = [natpmp.decode_response(p) for d, p in payloads if d == "resp"]
    assert responses == [
        ExternalAddressResponse(ResultCode.SUCCESS, 2833117, IPv4Address("10.201.213.174")),
        MapResponse(Opcode.MAP_TCP, ResultCode.SUCCESS, 2833125, 51413, 51413, 3600),
    ]
    for direction, payload in payloads:
        if direction == "req":
            assert natpmp.encode_request(natpmp.decode_request(payload)) == payload


@given(s.natpmp_requests())
def test_every_request_round_trips(request: natpmp.NatPmpRequest) -> None:
    assert natpmp.decode_request(natpmp.encode_request(request)) == request


@given(s.natpmp_responses())
def test_every_response_round_trips(response: natpmp.NatPmpResponse) -> None:
    assert natpmp.decode_response(natpmp.encode_response(response)) == response
