"""JSON messages with file descriptors over one AF_UNIX ``SOCK_SEQPACKET`` socket.

The agent speaks this with its zygote and with every sandboxed process: one JSON
object per packet, file descriptors attached with SCM_RIGHTS. SEQPACKET keeps
message boundaries, so a reader takes at most :data:`MAX_MESSAGE` bytes of a
message and learns (``MSG_TRUNC``) that it was longer: a peer cannot make it
buffer without end, as a 100 MB reply line on a stream socket would. Bulk data
never travels in a message. It travels as a *sealed* memfd: once sealed, neither
side can change it, so what one side checked is what the other reads.

Stdlib only (and :mod:`ipdc.errors`): this module is also bound into the sandbox,
where the runner uses it.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import stat
from collections.abc import Iterable, Sequence
from typing import Any

from ipdc.errors import SandboxError

#: The largest message either side reads; a longer one is a protocol breach.
MAX_MESSAGE = 64 << 10
#: The most file descriptors one message may carry.
MAX_FDS = 16
#: What makes a memfd immutable: no write, no growing, no shrinking, no unsealing.
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message (and ``fds``, which stay open here)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise SandboxError(f"a message of {len(data)} bytes is over the {MAX_MESSAGE}-byte cap")
    socket.send_fds(sock, [data], list(fds))


def recv(sock: socket.socket, timeout: float | None) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its fds; None when the peer has closed its end.

    TimeoutError after ``timeout`` seconds without a message. A message over
    :data:`MAX_MESSAGE` bytes, with more than :data:`MAX_FDS` fds, or that is not a
    JSON object raises SandboxError (its fds are closed first).
    """
    sock.settimeout(timeout)
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        what = f"more than {MAX_MESSAGE} bytes" if flags & socket.MSG_TRUNC else f"more than {MAX_FDS} fds"
        raise SandboxError(f"a message of {what} (the cap)")
    if not data and not fds:
        return None
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        close_all(fds)
        raise SandboxError(f"a message that is not a JSON object: {data[:80]!r}")
    return message, fds


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def sealed_memfd(parts: Iterable[bytes | bytearray | memoryview], name: str = "ipdc-data") -> int:
    """A new memfd holding ``parts`` one after the other, sealed, offset 0."""
    fd = memfd(name)
    try:
        for part in parts:
            write_all(fd, part)
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def memfd(name: str) -> int:
    """A new, empty memfd that :func:`seal` can seal: a writer fills it piece by piece, so
    bulk data need never be whole in the writer's memory."""
    return os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def seal(fd: int) -> None:
    """Make a filled memfd immutable and rewind it, ready to hand over."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    os.lseek(fd, 0, os.SEEK_SET)


def read_sealed(fd: int, limit: int) -> bytes:
    """The bytes of a sealed memfd from the other side, at most ``limit``; closes ``fd``.

    Anything else is refused with SandboxError: a file that could still change while
    it is read, a pipe or socket that could stall, a directory (``openat(fd, "..")``).
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SandboxError(f"an output that is not a memfd ({stat.filemode(st.st_mode)})")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & SEALS != SEALS:
            raise SandboxError("an output memfd that is not sealed (it could still change)")
        if st.st_size > limit:
            raise SandboxError(f"an output of {st.st_size} bytes, over the limit of {limit}")
        if not st.st_size:
            return b""
        with mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            return view[:]
    finally:
        os.close(fd)
