"""Byte relays between a TF process and the sockets that reach the rest of its cluster.

    python -I -S tfrelay.py '{"label": "demo/worker-0", "maps": [{"listen": "tcp:127.0.0.1:2223",
                                                                 "target": "unix:/.../t1.sock"}, ...]}'

Each map is ``LISTEN -> TARGET``:

* LISTEN is ``tcp:HOST:PORT`` (bound here) or ``fd:N``, a listening socket inherited
  from the host side: its unix serving socket, or the 127.0.0.1 TCP socket that
  kubo's ``p2p listen`` dials. A map with ``peers`` reads the line ``<peer-id>\\n`` kubo
  writes first (``report-peer-id``) and drops the connection unless the peer is one
  of the cluster's hosts: any member holds the swarm key, only the cluster's own
  hosts may reach its servers.
* TARGET is ``tcp:HOST:PORT`` or ``unix:PATH``, dialled once per accepted connection.

It is its own process, never a thread of a TF process: TensorFlow holds the GIL while
it waits on a remote call, and that call's bytes would have to pass through the relay
(a deadlock seen in the prototype). Once every listener is open it prints ``ready``
on stdout; it exits when its parent does. Standard library only: it runs in the
sandbox of the TF server it serves.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from dataclasses import dataclass

BUFFER = 256 * 1024
#: Longer than any peer ID line kubo writes.
PEER_LINE_MAX = 128
#: Seconds a stream from kubo may take to name its peer.
PEER_LINE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Map:
    listen: str
    target: str
    peers: frozenset[str] | None = None
    """When set, connections start with kubo's peer line, and only these peers pass."""


def _endpoint(spec: str) -> tuple[str, str]:
    kind, _, rest = spec.partition(":")
    if kind not in ("tcp", "unix", "fd") or not rest:
        raise ValueError(f"bad endpoint {spec!r}: use tcp:HOST:PORT, unix:PATH or fd:N")
    return kind, rest


def _nodelay(sock: socket.socket) -> None:
    """gRPC sends many small frames: do not let Nagle hold them back."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listener(spec: str) -> socket.socket:
    kind, rest = _endpoint(spec)
    if kind == "fd":
        return socket.socket(fileno=int(rest))
    if kind != "tcp":
        raise ValueError(f"cannot listen on {spec!r}: a unix listener is handed over as fd:N")
    host, _, port = rest.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(128)
    return sock


def dial(spec: str) -> socket.socket:
    kind, rest = _endpoint(spec)
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(rest)
        except OSError:
            sock.close()
            raise
        return sock
    if kind != "tcp":
        raise ValueError(f"cannot dial {spec!r}")
    host, _, port = rest.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    _nodelay(sock)
    return sock


def _pump(src: socket.socket, dst: socket.socket, first: bytes = b"") -> None:
    """Copy until EOF, then half-close ``dst``."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    try:
        if first:
            dst.sendall(first)
        while n := src.recv_into(buf):
            dst.sendall(view[:n])
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _peer_line(conn: socket.socket) -> tuple[str, bytes]:
    """The peer ID kubo writes first, and the bytes that came after it."""
    data = b""
    conn.settimeout(PEER_LINE_TIMEOUT)
    while b"\n" not in data:
        chunk = conn.recv(PEER_LINE_MAX)
        if not chunk or len(data) > PEER_LINE_MAX:
            raise OSError("the stream did not start with a peer line")
        data += chunk
    conn.settimeout(None)
    line, _, rest = data.partition(b"\n")
    return line.decode("ascii", "replace").strip(), rest


def _serve(conn: socket.socket, m: Map) -> None:
    first = b""
    try:
        _nodelay(conn)
        if m.peers is not None:
            peer, first = _peer_line(conn)
            if peer not in m.peers:
                log(f"refused a stream from peer {peer[:60]!r} on {m.listen}: not a host of this cluster")
                conn.close()
                return
        out = dial(m.target)
    except OSError as exc:
        log(f"{m.listen} -> {m.target}: {exc}")
        conn.close()
        return
    back = threading.Thread(target=_pump, args=(out, conn), daemon=True)
    back.start()
    _pump(conn, out, first)
    back.join()
    conn.close()
    out.close()


def _accept(sock: socket.socket, m: Map) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError as exc:
            log(f"accept on {m.listen} failed: {exc}")
            return
        threading.Thread(target=_serve, args=(conn, m), daemon=True).start()


def log(text: str) -> None:
    print(f"tfrelay: {text}", file=sys.stderr, flush=True)


def parse(plan: str) -> list[Map]:
    data = json.loads(plan)
    maps = []
    for item in data["maps"]:
        _endpoint(item["listen"])
        _endpoint(item["target"])
        peers = item.get("peers")
        maps.append(Map(item["listen"], item["target"], None if peers is None else frozenset(peers)))
    return maps


def main() -> None:
    maps = parse(sys.argv[1])
    parent = os.getppid()
    sockets = [listener(m.listen) for m in maps]
    for sock, m in zip(sockets, maps, strict=True):
        threading.Thread(target=_accept, args=(sock, m), daemon=True).start()
    print("ready", flush=True)
    while os.getppid() == parent:
        threading.Event().wait(1.0)


if __name__ == "__main__":
    main()
