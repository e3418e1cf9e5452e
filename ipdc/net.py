"""TCP ports on this machine: is one taken, does one answer, which one is free."""

from __future__ import annotations

import socket


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
            port = sock.getsockname()[1]
        if port not in taken:
            return port
