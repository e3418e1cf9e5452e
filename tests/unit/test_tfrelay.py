"""The TF relay as a real process: it carries bytes both ways, and lets a stream from kubo
through only when kubo's peer line names one of the cluster's hosts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.runner.tfserver import RELAY

HOST = "12D3KooWHost"


def echo_server(sock: socket.socket) -> None:
    """Answer every connection with what it sends, until it closes."""
    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A relay with two maps: kubo's target (an inherited listening socket, peer-checked) to a
    TCP echo server, and a TCP port to a unix echo server. Yields the two ports to dial."""
    tcp_echo = socket.create_server(("127.0.0.1", 0))
    unix_echo = socket.socket(socket.AF_UNIX)
    unix_echo.bind(str(tmp_path / "t1.sock"))
    unix_echo.listen()
    for server in (tcp_echo, unix_echo):
        echo_server(server)
    kubo_target = socket.create_server(("127.0.0.1", 0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    to_echo = f"tcp:127.0.0.1:{tcp_echo.getsockname()[1]}"
    maps = [{"listen": f"fd:{kubo_target.fileno()}", "target": to_echo, "peers": [HOST]},
            {"listen": f"tcp:127.0.0.1:{free}", "target": f"unix:{tmp_path / 't1.sock'}"}]
    argv = [sys.executable, "-I", "-S", str(RELAY), json.dumps({"label": "test", "maps": maps})]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=[kubo_target.fileno()])
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    try:
        yield kubo_target.getsockname()[1], free
    finally:
        proc.kill()
        proc.wait()
        for sock in (tcp_echo, unix_echo, kubo_target):
            sock.close()


def exchange(port: int, payload: bytes, want: int) -> bytes:
    """Send ``payload``, then read until ``want`` bytes came back or the relay closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < want:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_a_stream_from_a_cluster_host_reaches_the_task_without_the_peer_line(relay: tuple[int, int]) -> None:
    kubo_port, _ = relay
    body = b"PRI * HTTP/2.0\r\n" + bytes(range(256)) * 400
    assert exchange(kubo_port, HOST.encode() + b"\n" + body, len(body)) == body


def test_a_stream_from_any_other_peer_is_closed_unanswered(relay: tuple[int, int]) -> None:
    kubo_port, _ = relay
    assert exchange(kubo_port, b"12D3KooWStranger\nhello", 5) == b""
    assert exchange(kubo_port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24) == b""  # no peer line at all


def test_a_loopback_port_reaches_a_unix_socket(relay: tuple[int, int]) -> None:
    _, port = relay
    assert exchange(port, b"x" * 100_000, 100_000) == b"x" * 100_000
