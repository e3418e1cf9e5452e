"""Sockets on this machine: is a port taken, does one answer, which one is free; does a gRPC
server answer on a unix socket."""

from __future__ import annotations

import socket
from pathlib import Path


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port(host: str, preferred: int, taken: set[int]) -> int:
    """``preferred`` when it is free, else a port the kernel hands out (0: always that)."""
    if preferred and preferred not in taken and not port_in_use(host, preferred):
        return preferred
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in taken:
            return port


#: What a gRPC client sends first: the HTTP/2 connection preface and an empty SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def grpc_answers(path: Path, timeout: float = 2.0) -> bool:
    """True when a gRPC (HTTP/2) server answers through the unix socket at ``path``: it sends
    its SETTINGS frame first. A listening socket alone is not enough, since its backlog
    accepts connections before anyone serves them; this sees the whole path answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    return head[3] == 0x04  # the frame type: SETTINGS
