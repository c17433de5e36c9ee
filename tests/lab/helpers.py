"""Small helpers for lab tests: prove a mapping with a real TCP connection."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import threading
import weakref
from typing import IO

from portbroker.testing.lab import EXTERNAL_ADDRESS, LAN_ADDRESS, Lab


def listen_in_lan(lab: Lab, port: int) -> socket.socket:
    listener = lab.socket(lab.lan_ns, kind=socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(LAN_ADDRESS), port))
    listener.listen()
    listener.settimeout(5)
    return listener


def connect_from_wan(lab: Lab, listener: socket.socket, external_port: int) -> bytes:
    """Connect from the wan side to 11.0.0.1:*external_port*; return what the lan side sent.

    Raises ConnectionRefusedError when the gateway has no mapping for the port
    (it answers the SYN with a reset).
    """
    outside = lab.socket(lab.wan_ns, kind=socket.SOCK_STREAM)
    with outside:
        outside.settimeout(5)
        outside.connect((str(EXTERNAL_ADDRESS), external_port))
        inside, _peer = listener.accept()
        with inside:
            inside.sendall(b"inside says hello")
            return outside.recv(100)


def udp_to_gateway(lab: Lab, port: int) -> socket.socket:
    from portbroker.testing.lab import GATEWAY_ADDRESS

    sock = lab.socket(lab.lan_ns)
    sock.connect((str(GATEWAY_ADDRESS), port))
    return sock


class LineReader:
    """A subprocess's stdout, line by line, with a timeout that never misses a line.

    select() on a buffered text stream misses lines that a readline() already
    pulled into the buffer (two JSON events written together: the second one
    then "never came" and the test timed out). A thread reads the pipe and
    queues each line instead.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to *timeout* s for the stream's end to be read (every line queued)."""
        self._thread.join(timeout)

    def _read(self, stream: IO[str]) -> None:
        try:
            with stream:  # closed here at its end: see stop_read_process
                for line in stream:
                    self._lines.put(line)
        except (OSError, ValueError):
            pass  # closed under us (communicate() at a test's end): that is the end too
        self._lines.put("")  # the end

    @property
    def reading(self) -> bool:
        """The stream's end not read yet (another process may hold the pipe open)."""
        return self._thread.is_alive()

    def next(self, timeout: float) -> str | None:
        """The next line; "" once the stream ended; None after *timeout* seconds."""
        if self._ended:
            return ""
        try:
            line = self._lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if not line:
            self._ended = True
        return line


_READERS: weakref.WeakKeyDictionary[subprocess.Popen[str], LineReader] = weakref.WeakKeyDictionary()


def lines_of(process: subprocess.Popen[str]) -> LineReader:
    """The one LineReader of *process*'s stdout (made on first use)."""
    reader = _READERS.get(process)
    if reader is None:
        assert process.stdout is not None
        reader = _READERS[process] = LineReader(process.stdout)
    return reader


def stop_read_process(
    process: subprocess.Popen[str], signum: int = signal.SIGTERM, timeout: float = 15.0
) -> str:
    """Stop *process* (SIGCONT, then *signum*; SIGKILL after *timeout* s) and return its stderr.

    Its stdout is left to its LineReader: ``communicate()`` would read the same
    pipe. When both wait on it, communicate's select() can report a line that
    the reader thread then takes, leaving communicate in a blocking read that
    no timeout bounds, until the child writes again or exits. That hung CI for
    80 minutes: a monitor that ignored its SIGINT (inherited from a background
    shell) printed one last change while being stopped.
    """
    stdout, process.stdout = process.stdout, None  # communicate() then reads stderr only
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a stopped process cannot act on signum
            process.send_signal(signum)
        try:
            _out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            _out, err = process.communicate(timeout=30)
    finally:
        process.stdout = stdout
    if stdout is not None:
        reader = _READERS.get(process)
        if reader is not None:
            reader.join(5)  # the exited child's last lines, queued before the pipe closes
        if reader is None or not reader.reading:
            stdout.close()
        # Else a process of its own still holds the pipe: close() would wait
        # for the reader's read() as long as that one lives; the reader closes
        # it at its end.
    return err or ""
