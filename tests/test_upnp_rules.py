"""The UPnP method's rules as plain functions, fed real captures and plain values."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portbroker.methods import upnp_rules as rules
from portbroker.methods.upnp_rules import Remedy
from portbroker.types import MappingRequest, TransportProtocol
from tests.realdata import realdata

GATEWAY = IPv4Address("192.168.77.1")
IGD2_REPLY = realdata(
    "miniupnpd-2.3.1-live", "ssdp_msearch_urn_schemas-upnp-org_device_InternetGatewayDevice_2.txt"
).read_bytes()


def _capture(name: str) -> tuple[bytes, bytes]:
    """(request body, response bytes) of a miniupnpd-2.3.1-live SOAP capture."""
    text = realdata("miniupnpd-2.3.1-live", name).read_text()
    request, response = text.split("### RESPONSE", 1)
    request_body = request.split("\n\n", 1)[1].strip("\n")
    _, _, body = response.strip("\n").partition("\n\n")
    return request_body.encode(), body.encode()


# -- SSDP ---------------------------------------------------------------------------


def test_location_naming_another_host_is_pointed_at_the_gateway() -> None:
    assert rules.location_at_gateway("http://10.9.9.9:2189/rootDesc.xml?x=1", GATEWAY) == (
        "http://192.168.77.1:2189/rootDesc.xml?x=1"
    )
    assert rules.location_at_gateway("http://router.lan/d.xml", GATEWAY) == (
        "http://192.168.77.1:80/d.xml"
    )
    assert rules.location_at_gateway("http://[fe80::1]:5000/d.xml", IPv6Address("fe80::1")) == (
        "http://[fe80::1]:5000/d.xml"
    )
    assert rules.location_at_gateway("https://192.168.77.1/d.xml", GATEWAY) is None
    assert rules.location_at_gateway("file:///etc/passwd", GATEWAY) is None
    assert rules.location_at_gateway("http://h:99999/d.xml", GATEWAY) is None


def test_replies_are_judged_by_source_address_alone() -> None:
    reply = rules.accept_search_reply(IGD2_REPLY, "192.168.77.1", GATEWAY)
    assert reply is not None
    assert reply.location.startswith("http://192.168.77.1:")
    assert rules.accept_search_reply(IGD2_REPLY, "192.168.77.50", GATEWAY) is None
    assert rules.accept_search_reply(b"NOTIFY * HTTP/1.1\r\n\r\n", "192.168.77.1", GATEWAY) is None
    assert rules.accept_search_reply(IGD2_REPLY, "not an address", GATEWAY) is None


# -- the description --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "service_type", "control_url"),
    [
        # miniupnpc's own expected parse (testdesc/*.values), resolved.
        (
            "linksys_WAG200G_desc.xml",
            "urn:schemas-upnp-org:service:WANPPPConnection:1",
            "http://192.168.1.1:49152/upnp/control/WANPPPConn1",
        ),
        (
            "new_LiveBox_desc.xml",
            "urn:schemas-upnp-org:service:WANPPPConnection:2",
            "http://192.168.1.1:80/87895a19/upnp/control/WANIPConn1",
        ),
    ],
)
def test_the_service_miniupnpc_picks_is_picked(
    name: str, service_type: str, control_url: str
) -> None:
    text = realdata("miniupnp", "miniupnpc", "testdesc", name).read_text()
    found = rules.find_wan_service(text, "http://192.168.1.1:80/rootDesc.xml")
    assert found == rules.WanService(service_type, control_url)


def test_miniupnpd_description_resolves_against_the_location() -> None:
    text = realdata("miniupnpd-2.3.1-live", "rootDesc.xml").read_text()
    found = rules.find_wan_service(text, "http://192.168.77.1:2189/rootDesc.xml")
    assert found == rules.WanService(
        "urn:schemas-upnp-org:service:WANIPConnection:2", "http://192.168.77.1:2189/ctl/IPConn"
    )


@pytest.mark.parametrize("name", ["huaweiRootDescXML.xml", "noSupportedServicesRootDesc.xml"])
def test_descriptions_without_an_igd_wan_service_yield_none(name: str) -> None:
    text = realdata("tailscale", name).read_text()
    assert rules.find_wan_service(text, "http://192.168.1.1/rootDesc.xml") is None


def test_namespace_prefixes_and_entities_are_read() -> None:
    text = (
        "<d:root><d:service><d:serviceType>urn:schemas-upnp-org:service:WANIPConnection:1"
        "</d:serviceType><d:controlURL>/c?a=1&amp;b=2</d:controlURL></d:service>"
    )  # and the document never ends
    assert rules.find_wan_service(text, "http://10.0.0.1:5000/d.xml") == rules.WanService(
        "urn:schemas-upnp-org:service:WANIPConnection:1", "http://10.0.0.1:5000/c?a=1&b=2"
    )


@given(st.text(max_size=300))
def test_any_text_is_a_description_or_none(text: str) -> None:
    found = rules.find_wan_service(text, "http://10.0.0.1/d.xml")
    assert found is None or found.service_type.startswith("urn:schemas-upnp-org:service:WAN")


def test_control_urls_must_stay_on_the_gateway() -> None:
    assert rules.control_url_problem("http://192.168.77.1:2189/ctl/IPConn", GATEWAY) is None
    for url in (
        "http://127.0.0.2:9/ctl",
        "http://router.lan/ctl",
        "https://192.168.77.1/ctl",
        "http://192.168.77.1:99999/ctl",
    ):
        problem = rules.control_url_problem(url, GATEWAY)
        assert problem is not None
        assert "leads away from the gateway" in problem


# -- SOAP -----------------------------------------------------------------------------


def test_envelope_matches_the_bytes_miniupnpd_answered() -> None:
    sent, _ = _capture("soap_AddPortMapping_denied_port22.http")
    body = rules.soap_envelope(
        "urn:schemas-upnp-org:service:WANIPConnection:2",
        "AddPortMapping",
        [
            ("NewRemoteHost", ""),
            ("NewExternalPort", "22"),
            ("NewProtocol", "TCP"),
            ("NewInternalPort", "22"),
            ("NewInternalClient", "192.168.77.2"),
            ("NewEnabled", "1"),
            ("NewPortMappingDescription", "lab"),
            ("NewLeaseDuration", "3600"),
        ],
    )
    # The capture file keeps LF line ends.
    assert body.replace(b"\r\n", b"\n").strip() == sent.strip()


def test_miniupnpd_answers_a_delete_of_a_missing_entry_with_success() -> None:
    _, body = _capture("soap_DeletePortMapping_notfound.http")
    assert rules.parse_soap_fault(body) is None
    assert rules.parse_soap_response("DeletePortMapping", body) == {}


def test_envelope_escapes_argument_text() -> None:
    body = rules.soap_envelope("urn:x", "AddPortMapping", [("NewPortMappingDescription", "a<b&")])
    assert b"<NewPortMappingDescription>a&lt;b&amp;</NewPortMappingDescription>" in body


@pytest.mark.parametrize(
    ("capture", "code", "description"),
    [
        ("soap_AddPortMapping_denied_port22.http", 606, "Action not authorized"),
        ("soap_AddPortMapping_other_client_secure_mode.http", 718, "ConflictInMappingEntry"),
        ("soap_GetSpecificPortMappingEntry_notfound.http", 714, "NoSuchEntryInArray"),
        ("soap_InvalidAction.http", 401, "Invalid Action"),
    ],
)
def test_faults_give_their_code(capture: str, code: int, description: str) -> None:
    _, body = _capture(capture)
    assert rules.parse_soap_fault(body) == rules.SoapFault(code, description)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("testAddPortMappingPermanentLease.xml", 725),
        ("testAddPortMappingPermanentLease_InvalidArgs.xml", 402),  # "SOAP:" prefix
    ],
)
def test_faults_of_other_routers_give_their_code(name: str, code: int) -> None:
    fault = rules.parse_soap_fault(realdata("tailscale", name).read_bytes())
    assert fault is not None
    assert fault.code == code


def test_a_fault_without_a_code_is_read_from_its_description() -> None:
    body = b"<s:Fault><errorDescription>OnlyPermanentLeasesSupported</errorDescription></s:Fault>"
    assert rules.parse_soap_fault(body) == rules.SoapFault(725, "OnlyPermanentLeasesSupported")
    assert rules.parse_soap_fault(b"<html>500</html>") is None


def test_a_found_entry_is_read() -> None:
    _, body = _capture("soap_GetSpecificPortMappingEntry_ok.http")
    values = rules.parse_soap_response("GetSpecificPortMappingEntry", body)
    entry = rules.parse_port_mapping_entry(values)
    assert entry.internal_client == "192.168.77.2"
    assert entry.lease_remaining > 0
    with pytest.raises(ValueError, match="not a AddPortMapping response"):
        rules.parse_soap_response("AddPortMapping", body)
    with pytest.raises(ValueError, match="NewInternalClient"):
        rules.parse_port_mapping_entry({})


@pytest.mark.parametrize(
    "name", ["testGetStatusInfoResponse.xml", "testLegacyGetStatusInfoResponse.xml"]
)
def test_uptime_is_read_in_either_spelling(name: str) -> None:
    values = rules.parse_soap_response("GetStatusInfo", realdata("tailscale", name).read_bytes())
    assert rules.uptime_of(values) == 9999
    assert rules.uptime_of({"NewUptime": "soon"}) is None


# -- HTTP -------------------------------------------------------------------------------


def test_request_bytes() -> None:
    raw = rules.http_request("POST", "http://10.0.0.1:80/ctl?x", body=b"abc", headers=[("A", "b")])
    assert raw == (
        b"POST /ctl?x HTTP/1.1\r\nHost: 10.0.0.1\r\nA: b\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nabc"
    )
    with pytest.raises(ValueError, match="line breaks"):
        rules.http_request("GET", "http://10.0.0.1/", headers=[("A", "b\r\nEvil: 1")])


def _read(pieces: list[bytes], cap: int = 1000, *, eof: bool = True) -> rules.HttpResponse:
    reader = rules.HttpReader(cap)
    for piece in pieces:
        response = reader.feed(piece)
        if response is not None:
            return response
    assert eof
    return reader.close()


def test_responses_are_framed_by_length_chunks_or_close() -> None:
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"
    assert _read([whole[i : i + 1] for i in range(len(whole))], eof=False).body == b"hello"
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n"
    )
    assert _read([chunked[:20], chunked[20:41], chunked[41:]], eof=False).body == b"hello"
    one_by_one = [chunked[i : i + 1] for i in range(len(chunked))]
    assert _read(one_by_one, eof=False).body == b"hello"
    assert _read([b"HTTP/1.0 500 Oops\nServer: x\n\nbody"]) == rules.HttpResponse(
        500, "Oops", {"server": "x"}, b"body"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffff\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1001,
    ],
)
def test_a_response_past_the_cap_is_refused(raw: bytes) -> None:
    with pytest.raises(rules.ResponseTooLarge):
        _read([raw], eof=False)


def test_endless_headers_are_refused_too() -> None:
    reader = rules.HttpReader(1000)
    for _ in range(17):
        assert reader.feed(b"X-Junk: " + b"j" * 1000 + b"\r\n") is None
    with pytest.raises(rules.ResponseTooLarge):
        reader.feed(b"X-Junk: " + b"j" * 1000 + b"\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_unreadable_responses_are_value_errors(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies
        _read([raw])


def test_a_cut_response_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="closed"):
        _read([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhalf"])
    with pytest.raises(ValueError, match="closed"):
        _read([b"HTTP/1.1 200"])


@given(st.lists(st.binary(max_size=200), max_size=10))
def test_any_bytes_are_a_response_or_a_value_error(pieces: list[bytes]) -> None:
    reader = rules.HttpReader(500)
    try:
        for piece in pieces:
            if reader.feed(piece) is not None:
                return
        reader.close()
    except ValueError:
        pass


# -- AddPortMapping remedies and leases ---------------------------------------------------


def _remedy(code: int | None, **kwargs: object) -> Remedy:
    args: dict[str, object] = {
        "lease": 3600,
        "port": 8080,
        "internal_port": 8080,
        "exact": False,
        "tried_any": False,
    }
    args.update(kwargs)
    return rules.remedy_for(code, **args)  # type: ignore[arg-type]


def test_remedies() -> None:
    assert _remedy(725) is Remedy.PERMANENT_LEASE
    assert _remedy(402) is Remedy.PERMANENT_LEASE  # tailscale issue 15223
    assert _remedy(402, lease=0) is Remedy.GIVE_UP
    assert _remedy(724, port=9000) is Remedy.INTERNAL_PORT
    assert _remedy(724) is Remedy.GIVE_UP  # already the same port
    assert _remedy(724, port=9000, exact=True) is Remedy.GIVE_UP
    assert _remedy(718) is Remedy.ANY_PORT
    assert _remedy(718, tried_any=True) is Remedy.RANDOM_PORT
    assert _remedy(718, exact=True) is Remedy.GIVE_UP
    assert _remedy(606) is Remedy.GIVE_UP
    assert _remedy(None) is Remedy.GIVE_UP


def test_granted_lifetime() -> None:
    assert rules.granted_lifetime(None, 3600, 7200) == 3600  # taken as sent
    assert rules.granted_lifetime(604000, 0, 7200) == 604000  # AddAny's week, read back
    assert rules.granted_lifetime(0, 0, 7200) == 7200  # permanent: our own schedule
    assert rules.granted_lifetime(None, 0, 7200) == 7200  # unreadable: the same


def test_build_lease() -> None:
    request = MappingRequest(8080, "udp", 7200)
    lease = rules.build_lease(
        request,
        client=IPv4Address("192.168.77.2"),
        external_address=IPv4Address("203.0.113.7"),
        external_port=40000,
        lease_sent=0,
        lifetime=7200,
        now=10.0,
        gateway=GATEWAY,
        epoch=3,
    )
    assert (lease.method, lease.protocol, lease.external_port) == (
        "upnp",
        TransportProtocol.UDP,
        40000,
    )
    assert lease.permanent
    assert lease.expires_at == 7210.0
    assert lease.epoch == 3


def test_error_texts_map_back_to_codes() -> None:
    assert rules.upnp_error_code("ConflictInMappingEntry") == 718
    assert rules.upnp_error_code(" NoSuchEntryInArray ") == 714
    assert rules.upnp_error_code("Miniupnpc HTTP error") is None
