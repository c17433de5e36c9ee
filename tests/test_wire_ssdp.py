"""SSDP: M-SEARCH bytes, and every real search reply parses."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portbroker.errors import MalformedMessage
from portbroker.wire import ssdp
from tests.realdata import realdata, ssdp_replies

MINIUPNPD_LOCATION = "http://192.168.77.1:2189/rootDesc.xml"


def test_multicast_msearch_matches_miniupnpc_bytes() -> None:
    # protocols.md §4.1: the exact bytes miniupnpc and tailscale send.
    assert ssdp.encode_msearch(ssdp.ST_IGD_V1) == (
        b"M-SEARCH * HTTP/1.1\r\n"
        b"HOST: 239.255.255.250:1900\r\n"
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b'MAN: "ssdp:discover"\r\n'
        b"MX: 2\r\n"
        b"\r\n"
    )


def test_unicast_msearch_has_no_mx_and_names_the_device() -> None:
    raw = ssdp.encode_msearch(ssdp.ST_IGD_V2, host="192.168.77.1", mx=None)
    assert b"MX" not in raw
    assert b"HOST: 192.168.77.1:1900\r\n" in raw
    request = ssdp.decode_msearch(raw)
    assert (request.st, request.mx, request.host) == (ssdp.ST_IGD_V2, None, "192.168.77.1:1900")


def test_ipv6_host_is_bracketed() -> None:
    raw = ssdp.encode_msearch(ssdp.ST_IGD_V1, host=ssdp.MULTICAST_V6_LINK)
    assert b"HOST: [ff02::c]:1900\r\n" in raw


@pytest.mark.parametrize("st_value", ["", "a\r\nMX: 5"])
def test_unusable_search_target_is_refused(st_value: str) -> None:
    with pytest.raises(ValueError, match="search target"):
        ssdp.encode_msearch(st_value)


@pytest.mark.parametrize("st_value", ssdp.SEARCH_TARGETS)
def test_every_search_target_round_trips(st_value: str) -> None:
    assert ssdp.decode_msearch(ssdp.encode_msearch(st_value, mx=1)).st == st_value


# What each captured reply must yield: (LOCATION, ST, USN).
EXPECTED = {
    "tailscale/googleWifiUPnPDisco.http": (
        "http://192.168.86.1:5000/rootDesc.xml",
        ssdp.ST_IGD_V2,
        "uuid:a9708184-a6c0-413a-bbac-11bcf7e30ece::" + ssdp.ST_IGD_V2,
    ),
    "tailscale/huaweiUPnPDisco.http": (
        "http://192.168.1.1:49652/49652gatedesc.xml",
        ssdp.ST_IGD_V1,
        "uuid:00e0fc37-2525-2828-2500-0C31DCD93368::" + ssdp.ST_IGD_V1,
    ),
    "tailscale/pfSenseUPnPDisco.http": (
        "http://192.168.1.1:2189/rootDesc.xml",
        ssdp.ST_IGD_V1,
        "uuid:bee7052b-49e8-3597-b545-55a1e38ac11::" + ssdp.ST_IGD_V1,
    ),
    "tailscale/sagemcomUPnPDisco.http": (
        "http://192.168.0.1:49153/69692b70/gatedesc0b.xml",
        ssdp.ST_IGD_V1,
        "uuid:75802409-bccb-40e7-8e6c-fa095ecce13e::" + ssdp.ST_IGD_V1,
    ),
}


@pytest.mark.parametrize(("name", "raw"), ssdp_replies(), ids=[n for n, _ in ssdp_replies()])
def test_every_captured_reply_parses(name: str, raw: bytes) -> None:
    reply = ssdp.decode_response(raw)
    if name.startswith("miniupnpd/"):
        assert reply.location == MINIUPNPD_LOCATION
        assert reply.usn is not None
        # UDA 1.1 §1.3.3: USN is uuid:<device>::<type>, or the bare uuid when ST is one.
        assert reply.usn == reply.st or reply.usn.endswith("::" + reply.st)
        assert reply.uuid is not None
        assert reply.uuid.startswith("3a1e6b1c-1111-4e0f-9a6b-0123456789a")
        assert (reply.boot_id, reply.config_id, reply.max_age) == (1795770010, 1337, 120)
        assert reply.server == "Debian/6.18.44-fc-v782 UPnP/1.1 MiniUPnPd/2.3.1"
    else:
        assert (reply.location, reply.st, reply.usn) == EXPECTED[name]


def test_the_ssdp_all_capture_holds_every_service_type() -> None:
    sts = {ssdp.decode_response(raw).st for name, raw in ssdp_replies() if "ssdp_all" in name}
    assert ssdp.ST_IGD_V2 in sts
    assert ssdp.ST_WAN_IP_CONNECTION_V2 in sts
    assert ssdp.ST_WAN_PPP_CONNECTION_V1 in sts


def test_optional_headers_may_be_missing_or_empty() -> None:
    huawei = ssdp.decode_response(realdata("tailscale", "huaweiUPnPDisco.http").read_bytes())
    assert (huawei.boot_id, huawei.config_id, huawei.max_age) == (None, None, 1800)
    sagemcom = ssdp.decode_response(realdata("tailscale", "sagemcomUPnPDisco.http").read_bytes())
    assert sagemcom.server == ""


@pytest.mark.parametrize(
    "path",
    ["replay_Actiontec_GT784WN.json", "replay_NewMedia-NET_GmbH_Generic_X86.json"],
)
def test_aioupnp_replays_rebuilt_with_their_header_spelling(path: str) -> None:
    # aioupnp keeps the reply as a dict with the device's own header spelling.
    gateway = json.loads(realdata("aioupnp", path).read_text())["gateway"]
    reply = gateway["reply"]
    lines = ["HTTP/1.1 200 OK"] + [
        f"{key.replace('_', '-')}: {value}" for key, value in reply.items()
    ]
    parsed = ssdp.decode_response(("\r\n".join(lines) + "\r\n\r\n").encode())
    location = reply.get("Location") or reply.get("LOCATION")
    assert parsed.location == location
    assert parsed.st == reply["ST"]


class TestTolerance:
    def test_lower_case_bare_lf_and_odd_spacing(self) -> None:
        raw = (
            b"HTTP/1.1 200 OK\n"
            b"cache-control:max-age = 1800\n"
            b"location:   http://10.0.0.1:80/d.xml  \n"
            b"st:upnp:rootdevice\n"
            b"\n"
        )
        reply = ssdp.decode_response(raw)
        assert (reply.location, reply.st, reply.max_age) == (
            "http://10.0.0.1:80/d.xml",
            "upnp:rootdevice",
            1800,
        )
        assert reply.usn is None

    @pytest.mark.parametrize(
        ("value", "want"),
        [
            ('max-age="300"', 300),
            ('no-cache="Ext", max-age = 5000', 5000),
            ("MAX-AGE=60", 60),
            ("no-cache", None),
        ],
    )
    def test_cache_control_variants(self, value: str, want: int | None) -> None:
        raw = f"HTTP/1.1 200 OK\r\nCACHE-CONTROL: {value}\r\nLOCATION: x\r\nST: y\r\n\r\n"
        assert ssdp.decode_response(raw.encode()).max_age == want

    def test_unreadable_boot_id_is_none(self) -> None:
        raw = b"HTTP/1.1 200 OK\r\nBOOTID.UPNP.ORG: soon\r\nLOCATION: x\r\nST: y\r\n\r\n"
        assert ssdp.decode_response(raw).boot_id is None

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (b"HTTP/1.1 404 Not Found\r\nLOCATION: x\r\nST: y\r\n\r\n", "status"),
            (b"HTTP/1.1 200 OK\r\nST: y\r\n\r\n", "LOCATION"),
            (b"HTTP/1.1 200 OK\r\nLOCATION: x\r\n\r\n", "ST"),
            (b"garbage\r\n\r\n", "not an SSDP"),
            (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
            (b"", "empty"),
        ],
    )
    def test_broken_replies_say_what_is_wrong(self, raw: bytes, reason: str) -> None:
        with pytest.raises(MalformedMessage, match=reason):
            ssdp.decode_response(raw)


class TestNotify:
    ALIVE = (
        b"NOTIFY * HTTP/1.1\r\n"
        b"HOST: 239.255.255.250:1900\r\n"
        b"CACHE-CONTROL: max-age=120\r\n"
        b"LOCATION: http://192.168.77.1:2189/rootDesc.xml\r\n"
        b"NT: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n"
        b"NTS: ssdp:alive\r\n"
        b"USN: uuid:3a1e6b1c-1111-4e0f-9a6b-0123456789ab::urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n"
        b"BOOTID.UPNP.ORG: 7\r\n"
        b"CONFIGID.UPNP.ORG: 1337\r\n"
        b"\r\n"
    )

    def test_alive(self) -> None:
        notify = ssdp.decode(self.ALIVE)
        assert isinstance(notify, ssdp.Notify)
        assert (notify.nts, notify.nt, notify.boot_id) == ("ssdp:alive", ssdp.ST_IGD_V2, 7)
        assert notify.location == MINIUPNPD_LOCATION

    def test_byebye_needs_no_location(self) -> None:
        raw = b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\nNTS: ssdp:byebye\r\nUSN: uuid:x\r\n\r\n"
        notify = ssdp.decode_notify(raw)
        assert (notify.nts, notify.location) == ("ssdp:byebye", None)

    def test_update_carries_next_boot_id(self) -> None:
        raw = self.ALIVE.replace(b"ssdp:alive", b"ssdp:update").replace(
            b"\r\n\r\n", b"\r\nNEXTBOOTID.UPNP.ORG: 8\r\n\r\n"
        )
        assert ssdp.decode_notify(raw).next_boot_id == 8

    def test_alive_without_location_is_malformed(self) -> None:
        raw = b"NOTIFY * HTTP/1.1\r\nNT: a\r\nNTS: ssdp:alive\r\n\r\n"
        with pytest.raises(MalformedMessage, match="LOCATION"):
            ssdp.decode_notify(raw)


@given(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60),
    st.integers(1, 5),
)
def test_msearch_round_trips_for_any_search_target(target: str, mx: int) -> None:
    request = ssdp.decode_msearch(ssdp.encode_msearch(target, mx=mx))
    assert (request.st, request.mx) == (target, mx)
