"""Every file in examples/ runs in a test; this file runs those no other test does.

:data:`RUN_BY` names, for each file under examples/, the tests that run it: a
new example with no entry fails :func:`test_every_example_has_a_test_that_runs_it`,
and so does an entry whose test file does not run it (never names it). Here:
examples/decode.py on real datagrams, examples/two_apps.py against a daemon on
a FakeGateway (tests/docs_harness.py's), and the systemd units' command line
as systemd runs it (socket activation, the arguments of portbroker.env).
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from portbroker.client import BlockingClient
from portbroker.wire import pcp
from tests import docs_harness

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PYTHON = sys.executable
THIS = "tests/test_examples.py"

RUN_BY: dict[str, tuple[str, ...]] = {
    "decode.py": (THIS,),
    "two_apps.py": (THIS,),
    # On this host with two FakeGateways, and across the lab's two real NATs.
    "p2p_chat.py": ("tests/test_example_p2p_chat.py", "tests/lab/test_lab_p2p_chat.py"),
    "rendezvous_server.py": ("tests/test_example_p2p_chat.py", "tests/lab/test_lab_p2p_chat.py"),
    "systemd/portbroker.service": (THIS,),
    "systemd/portbroker.socket": (THIS,),
    "systemd/portbroker.env": (THIS,),
}


def test_every_example_has_a_test_that_runs_it() -> None:
    present = {
        str(path.relative_to(EXAMPLES))
        for path in EXAMPLES.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert present == set(RUN_BY), (
        f"examples without a test: {sorted(present - set(RUN_BY))};"
        f" tests for examples that are gone: {sorted(set(RUN_BY) - present)}"
    )
    for name, tests in RUN_BY.items():
        for test in tests:
            text = (ROOT / test).read_text()
            if test == THIS:
                # This table names every example: look for it in the tests below.
                text = text.split("\n}\n", 1)[1]
            assert Path(name).name in text, f"{test} does not run examples/{name}"


def _decode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(EXAMPLES / "decode.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# A PCP MAP answer (the one README's codec example decodes) and NAT-PMP's
# external-address answer of decode.py's own docstring.
PCP_ANSWER = (
    "02810000 00001c20 00000000 00000000 00000000 00000000 01010101 01010101"
    " 01010101 11000000 ca6cca6c 00000000 00000000 0000ffff cb007107"
).replace(" ", "")
NATPMP_ANSWER = "00800000000002cc0b16212c"


def test_decode_prints_a_pcp_answer() -> None:
    done = _decode("pcp", PCP_ANSWER)
    assert done.returncode == 0, done.stderr
    assert "PcpResponse(opcode=<Opcode.MAP: 1>, result_code=<ResultCode.SUCCESS: 0>" in done.stdout
    assert "external_port=51820, external_address=IPv4Address('203.0.113.7')" in done.stdout


def test_decode_prints_a_natpmp_answer() -> None:
    done = _decode("natpmp", NATPMP_ANSWER)
    assert done.returncode == 0, done.stderr
    assert "external_address=IPv4Address('11.22.33.44')" in done.stdout


def test_decode_reads_an_ssdp_reply_from_a_file(tmp_path: Path) -> None:
    reply = tmp_path / "reply.http"
    reply.write_bytes(
        b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:"
        b"InternetGatewayDevice:1\r\nUSN: uuid:1::urn:schemas-upnp-org:device:"
        b"InternetGatewayDevice:1\r\nEXT:\r\nSERVER: Linux UPnP/1.1 MiniUPnPd/2.3.1\r\n"
        b"LOCATION: http://192.168.77.1:2189/rootDesc.xml\r\n\r\n"
    )
    done = _decode("ssdp", str(reply))
    assert done.returncode == 0, done.stderr
    assert "http://192.168.77.1:2189/rootDesc.xml" in done.stdout


@pytest.mark.parametrize(
    ("args", "rc", "says"),
    [
        (("pcp", "zz"), 2, "cannot read 'zz'"),
        (("pcp", "0281"), 1, "not decodable"),
        (("ssdp", "/nonexistent/reply.http"), 2, "cannot read"),
        (("tcp", "00"), 2, "Decode a PCP, NAT-PMP or SSDP datagram"),
    ],
)
def test_decode_refuses_bad_input_in_words(args: tuple[str, str], rc: int, says: str) -> None:
    done = _decode(*args)
    assert done.returncode == rc, (done.stdout, done.stderr)
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_two_apps_share_one_mapping_through_the_daemon() -> None:
    with docs_harness.Gateways() as gateways, docs_harness.daemon(gateways) as sock:
        done = subprocess.run(
            [PYTHON, str(EXAMPLES / "two_apps.py")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PORTBROKER_SOCKET": str(sock)},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "trio app: reachable at 203.0.113.7:8080" in done.stdout
        assert "blocking app: the same mapping, now with 2 holders" in done.stdout
        # One gateway mapping for both apps (one nonce), deleted when the last let go.
        maps = [
            r
            for r in gateways.v4.requests
            if isinstance(r, pcp.PcpRequest) and r.opcode is pcp.Opcode.MAP and r.lifetime > 0
        ]
        assert len({r.data.nonce for r in maps if isinstance(r.data, pcp.MapData)}) == 1, maps
        assert not gateways.v4.mappings
        with BlockingClient(sock, timeout=30) as client:
            assert client.list() == []


# -- the systemd units ----------------------------------------------------------------

WRAPPER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "portbroker.cli", *sys.argv[2:]])
"""


def _unit(name: str) -> dict[str, str]:
    values = {}
    for line in (EXAMPLES / "systemd" / name).read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def test_the_systemd_units_command_line_serves_the_activated_socket() -> None:
    service = _unit("portbroker.service")
    socket_unit = _unit("portbroker.socket")
    assert service["EnvironmentFile"] == "-/etc/default/portbroker"
    assert socket_unit["ListenStream"] == "/run/portbroker/portbroker.sock"
    env_args = shlex.split(_unit("portbroker.env")["PORTBROKER_ARGS"].strip('"'))
    command = shlex.split(service["ExecStart"].replace("$PORTBROKER_ARGS", shlex.join(env_args)))
    assert Path(command[0]).name == "portbroker"
    assert command[1] == "daemon"
    # systemd's socket, as the .socket unit makes it (the group it names may
    # not exist here: the daemon leaves an activated socket's mode to systemd).
    directory = Path(tempfile.mkdtemp(prefix="pbu-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(directory / "portbroker.sock"))
    os.chmod(directory / "portbroker.sock", int(socket_unit["SocketMode"], 8))
    listener.listen()
    with docs_harness.Gateways() as gateways:
        process = subprocess.Popen(
            [
                PYTHON,
                "-c",
                WRAPPER,
                str(listener.fileno()),
                *command[1:],
                # The units' paths are the system's; these are the test's, and
                # the gateway is the FakeGateway, not this machine's.
                "--socket",
                str(directory / "unused.sock"),
                "--state",
                str(directory / "state.json"),
                "--gateway",
                "127.0.0.1",
                *gateways.pin(socket.AF_INET),
                "--no-announcements",
            ],
            pass_fds=[listener.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
        listener.close()
        try:
            with BlockingClient(directory / "portbroker.sock", timeout=30) as client:
                mapping = client.map(8080, "tcp")
                assert mapping["external_address"] == "203.0.113.7"
                client.unmap(8080, "tcp")
            assert not (directory / "unused.sock").exists()
        finally:
            process.terminate()
            _, err = process.communicate(timeout=20)
            shutil.rmtree(directory, ignore_errors=True)
        assert "Traceback" not in err, err
