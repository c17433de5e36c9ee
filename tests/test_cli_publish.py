"""The CLI's DNS-SD options: refused with the rule before anything is sent.

No test here starts zeroconf or talks to a gateway: every case is refused
while the command line is read (tests/lab/test_lab_dnssd.py runs them for real).
"""

from __future__ import annotations

import pytest

from portbroker.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = int(exc.code or 0)
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status", "words"),
    [
        (["map", "8080", "--publish", "http:web"], 2, "is not of the form '_name._tcp.local.'"),
        (["map", "8080", "--publish", "_http._tcp"], 2, "expected TYPE:NAME"),
        (["map", "8080", "--publish", "_http._tcp:" + "x" * 64], 2, "1..63 bytes"),
        (
            ["map", "8080", "--publish", "_http._tcp:web", "--txt", "ext_addr=1.2.3.4"],
            2,
            "portbroker's own",
        ),
        (["map", "8080", "--publish", "_http._tcp:web", "--txt", "novalue"], 2, "KEY=VALUE"),
        # A byte that is not UTF-8 on the command line (surrogateescape).
        (["map", "8080", "--publish", "_http._tcp:web", "--txt", "k=\udcff"], 2, "not valid UTF-8"),
        (["map", "8080", "--txt", "a=b", "--no-daemon"], 2, "--txt goes with --publish"),
        # Refused before anything is mapped: through the daemon, the map
        # stayed (persistent) under a "map failed" for the publish.
        (
            ["map", "5000/udp", "--publish", "_http._tcp:web", "--gateway", "127.0.0.1"],
            2,
            "is TCP, but 5000/udp is UDP",
        ),
        (
            ["map", "8080", "--publish", "_http._tcp:web", "--no-daemon", "--gateway", "127.0.0.1"],
            2,
            "needs --hold",
        ),
        (["browse", "http"], 1, "browse failed: service type 'http' is not of the form"),
        (["browse", "_http._tcp", "--interface", "eth0"], 1, "is not an IP address"),
        (["daemon", "--max-publications", "0"], 2, "--max-publications"),
    ],
)
def test_bad_publish_options_are_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], status: int, words: str
) -> None:
    got, err = run(capsys, *argv)
    assert got == status
    assert words in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("hold", "persist", "words"),
    [
        (False, False, "it stays mapped (`portbroker unmap 8080/tcp` ends it)"),
        (True, False, "it ends with this command"),
        (True, True, "it stays mapped"),
    ],
)
async def test_a_daemon_publish_that_fails_says_the_mapping_is_made(
    hold: bool, persist: bool, words: str
) -> None:
    # The map went through: "map failed" alone would hide a mapping that
    # (without --hold) outlives the command.
    import argparse

    from portbroker.cli import Failure, _daemon_publish
    from portbroker.client import DaemonRequestError

    class Refusing:
        async def publish(self, *_args: object, **_kwargs: object) -> None:
            raise DaemonRequestError(
                "conflict", "'web' (_http._tcp.local.) is published already", {}
            )

    args = argparse.Namespace(
        spec=(8080, "tcp"),
        publish=("_http._tcp.local.", "web"),
        txt=[],
        hold=hold,
        persist=persist,
        json=False,
    )
    with pytest.raises(Failure) as failed:
        await _daemon_publish(Refusing(), args)
    message = str(failed.value)
    assert message.startswith("8080/tcp is mapped, but publishing it failed: conflict: ")
    assert words in message
