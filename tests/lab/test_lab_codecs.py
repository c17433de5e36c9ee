"""The codecs against a real miniupnpd, proven by connections from outside.

Only the wire codecs and plain UDP sockets in the lan namespace are used
here; the broker has its own lab tests.
"""

from __future__ import annotations

import secrets
import socket
import time

import attrs
import pytest

from portbroker.epoch import EpochCheck, EpochObservation, check_natpmp_epoch, check_pcp_epoch
from portbroker.testing.lab import (
    EXTERNAL_ADDRESS,
    GATEWAY_ADDRESS,
    HTTP_PORT,
    LAN_ADDRESS,
    Lab,
    exchange,
)
from portbroker.wire import natpmp, pcp, ssdp
from tests.lab.helpers import connect_from_wan, listen_in_lan, udp_to_gateway


def pcp_map(port: int, *, lifetime: int = 600, nonce: bytes | None = None) -> pcp.PcpRequest:
    return pcp.PcpRequest(
        pcp.Opcode.MAP,
        lifetime,
        LAN_ADDRESS,
        pcp.MapData(nonce or secrets.token_bytes(12), socket.IPPROTO_TCP, port, port),
    )


def pcp_call(sock: socket.socket, request: pcp.PcpRequest) -> pcp.PcpResponse:
    response = exchange(sock, pcp.encode_request(request), pcp.decode_response)
    if request.data is not None:
        assert response.data is not None
        assert response.data.nonce == request.data.nonce
    return response


def natpmp_call(sock: socket.socket, request: natpmp.NatPmpRequest) -> natpmp.NatPmpResponse:
    return exchange(sock, natpmp.encode_request(request), natpmp.decode_response)


def test_pcp_map_lets_a_connection_in_and_delete_shuts_it(lab_full: Lab) -> None:
    port = 20001
    with listen_in_lan(lab_full, port) as listener, udp_to_gateway(lab_full, 5351) as udp:
        request = pcp_map(port)
        response = pcp_call(udp, request)
        assert response.result_code is pcp.ResultCode.SUCCESS
        assert response.data is not None
        assert response.data.external_address == EXTERNAL_ADDRESS
        assert response.lifetime == 600
        assert connect_from_wan(lab_full, listener, response.data.external_port) == (
            b"inside says hello"
        )

        deleted = pcp_call(udp, attrs.evolve(request, lifetime=0))
        assert (deleted.result_code, deleted.lifetime) == (pcp.ResultCode.SUCCESS, 0)
        with pytest.raises(ConnectionRefusedError):
            connect_from_wan(lab_full, listener, response.data.external_port)


def test_pcp_delete_with_another_nonce_is_refused_and_the_mapping_stays(lab_full: Lab) -> None:
    port = 20002
    with listen_in_lan(lab_full, port) as listener, udp_to_gateway(lab_full, 5351) as udp:
        request = pcp_map(port)
        granted = pcp_call(udp, request)
        assert granted.data is not None
        assert request.data is not None
        thief = attrs.evolve(
            request,
            lifetime=0,
            data=attrs.evolve(request.data, nonce=secrets.token_bytes(12)),
        )
        refused = pcp_call(udp, thief)
        assert refused.result_code is pcp.ResultCode.NOT_AUTHORIZED
        assert connect_from_wan(lab_full, listener, granted.data.external_port)
        assert pcp_call(udp, attrs.evolve(request, lifetime=0)).result_code == 0


def test_natpmp_map_and_delete(lab_full: Lab) -> None:
    port = 20003
    with listen_in_lan(lab_full, port) as listener, udp_to_gateway(lab_full, 5351) as udp:
        address = natpmp_call(udp, natpmp.ExternalAddressRequest())
        assert address == natpmp.ExternalAddressResponse(0, address.epoch, EXTERNAL_ADDRESS)

        mapped = natpmp_call(udp, natpmp.MapRequest(natpmp.Opcode.MAP_TCP, port, port, 600))
        assert isinstance(mapped, natpmp.MapResponse)
        assert (mapped.result_code, mapped.internal_port, mapped.lifetime) == (0, port, 600)
        assert connect_from_wan(lab_full, listener, mapped.external_port)

        deleted = natpmp_call(udp, natpmp.MapRequest(natpmp.Opcode.MAP_TCP, port, 0, 0))
        assert isinstance(deleted, natpmp.MapResponse)
        assert (deleted.result_code, deleted.external_port, deleted.lifetime) == (0, 0, 0)
        with pytest.raises(ConnectionRefusedError):
            connect_from_wan(lab_full, listener, mapped.external_port)


def _announce(sock: socket.socket) -> EpochObservation:
    response = pcp_call(sock, pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, LAN_ADDRESS))
    assert response.result_code is pcp.ResultCode.SUCCESS
    return EpochObservation(response.epoch, time.monotonic())


def _external_address(sock: socket.socket) -> EpochObservation:
    response = natpmp_call(sock, natpmp.ExternalAddressRequest())
    return EpochObservation(response.epoch, time.monotonic())


def test_restart_resets_the_epoch_and_epoch_rules_say_state_lost(fresh_lab: Lab) -> None:
    with udp_to_gateway(fresh_lab, 5351) as udp:
        # Let the epoch grow past the one-second step-back tolerance first.
        pcp_before = _announce(udp)
        while pcp_before.server_epoch < 3:
            time.sleep(0.5)
            now = _announce(udp)
            assert check_pcp_epoch(pcp_before, now) is EpochCheck.VALID
            pcp_before = now
        natpmp_before = _external_address(udp)
        assert check_natpmp_epoch(natpmp_before, _external_address(udp)) is EpochCheck.VALID

        fresh_lab.restart_miniupnpd()

        pcp_after = _announce(udp)
        assert pcp_after.server_epoch < pcp_before.server_epoch
        assert check_pcp_epoch(pcp_before, pcp_after).state_lost
        assert check_natpmp_epoch(natpmp_before, _external_address(udp)).state_lost
        assert "restart 1" in fresh_lab.log_text()


def test_restart_forgets_mappings(fresh_lab: Lab) -> None:
    port = 20004
    with listen_in_lan(fresh_lab, port) as listener, udp_to_gateway(fresh_lab, 5351) as udp:
        response = pcp_call(udp, pcp_map(port))
        assert response.data is not None
        fresh_lab.restart_miniupnpd()
        with pytest.raises(ConnectionRefusedError):
            connect_from_wan(fresh_lab, listener, response.data.external_port)


def test_pcp_to_a_upnp_only_gateway_is_refused_at_once(lab_upnp_only: Lab) -> None:
    with udp_to_gateway(lab_upnp_only, pcp.SERVER_PORT) as udp:
        udp.send(pcp.encode_request(pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, LAN_ADDRESS)))
        # A connected UDP socket turns the ICMP port unreachable into an
        # error on the next call; a timeout here would mean it was missed.
        udp.settimeout(30)
        with pytest.raises(ConnectionRefusedError):
            udp.recv(2048)


def test_upnp_only_gateway_answers_a_unicast_search(lab_upnp_only: Lab) -> None:
    with udp_to_gateway(lab_upnp_only, ssdp.PORT) as udp:
        search = ssdp.encode_msearch(ssdp.ST_IGD_V1, host=GATEWAY_ADDRESS, mx=None)
        reply = exchange(udp, search, ssdp.decode_response)
    assert reply.st == ssdp.ST_IGD_V1
    assert reply.location == f"http://{GATEWAY_ADDRESS}:{HTTP_PORT}/rootDesc.xml"
    assert reply.boot_id is not None


def test_pcp_natpmp_only_gateway_refuses_ssdp_and_speaks_pcp(lab_pcp_natpmp_only: Lab) -> None:
    with udp_to_gateway(lab_pcp_natpmp_only, ssdp.PORT) as udp:
        udp.send(ssdp.encode_msearch(ssdp.ST_IGD_V1, host=GATEWAY_ADDRESS, mx=None))
        udp.settimeout(30)
        with pytest.raises(ConnectionRefusedError):
            udp.recv(2048)
    with udp_to_gateway(lab_pcp_natpmp_only, pcp.SERVER_PORT) as udp:
        assert _announce(udp).server_epoch >= 0


def test_no_service_gateway_refuses_pcp_and_ssdp(lab_no_service: Lab) -> None:
    assert lab_no_service.miniupnpd_pid is None
    for port, payload in (
        (pcp.SERVER_PORT, pcp.encode_request(pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, LAN_ADDRESS))),
        (ssdp.PORT, ssdp.encode_msearch(ssdp.ST_IGD_V1, host=GATEWAY_ADDRESS, mx=None)),
    ):
        with udp_to_gateway(lab_no_service, port) as udp:
            udp.send(payload)
            udp.settimeout(30)
            with pytest.raises(ConnectionRefusedError):
                udp.recv(2048)


def test_miniupnpd_installs_dnat_rules_for_a_mapping(lab_full: Lab) -> None:
    port = 20005
    with udp_to_gateway(lab_full, 5351) as udp:
        request = pcp_map(port)
        response = pcp_call(udp, request)
        assert response.data is not None
        assert f"dnat ip to {LAN_ADDRESS}:{port}" in lab_full.nft_rules()
        pcp_call(udp, attrs.evolve(request, lifetime=0))
        assert f"dnat ip to {LAN_ADDRESS}:{port}" not in lab_full.nft_rules()
