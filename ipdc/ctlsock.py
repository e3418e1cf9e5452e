"""How the CLI (and the node tooling) talk to a node's controller service: JSON lines over
a unix socket.

The socket is ``$IPDC_HOME/run/control.sock``, mode 0600, and the service also
checks that the connecting process runs as its own user (``SO_PEERCRED``): the
socket can submit jobs signed with the node's key, so only the node's user may
use it. Each connection carries one request (one JSON line with an ``op``) and
its answers (JSON lines); a streaming request (``watch``) ends with a line that
has ``"end": true``. A failure is ``{"ok": false, "error": ..., "exit_code": ...}``,
raised here as the error the CLI prints.

Only the standard library is imported here: every ``ipdc`` command that talks to
the service loads this module, and the CLI must start fast (no broker, no HTTP
client: the service holds those connections already).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ipdc.errors import ControlError, JobCancelled, JobError

SOCKET_NAME = "control.sock"
#: The longest path a unix socket address may have on Linux (sun_path, less the NUL).
MAX_SOCKET_PATH = 107


def socket_path(home: Path) -> Path:
    return home / "run" / SOCKET_NAME


@contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits a unix socket's 107 characters: the path itself, or,
    for a deep node home, the same file reached through an open descriptor of its directory
    (``/proc/self/fd/N/control.sock``). The socket stays where it is, with its 0600 mode."""
    if len(str(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    try:
        fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise ControlError(f"cannot open {path.parent}: {exc}") from None
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def remote_error(reply: dict[str, Any]) -> JobError:
    """The error a failed reply stands for, with its message and exit code."""
    message = str(reply.get("error") or "the controller service failed without saying why")
    error = JobCancelled(message) if reply.get("cancelled") else JobError(message)
    error.exit_code = int(reply.get("exit_code") or 1)
    return error


class ControlClient:
    """Requests to the controller service of the node in ``home``."""

    def __init__(self, home: Path, timeout: float | None = 30.0) -> None:
        self.path = socket_path(home)
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with socket_address(self.path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, ControlError):
            sock.close()
            raise ControlError(f"the controller service of {self.path.parent.parent} is not running: start "
                               "the node with `python deploy.py start` (it starts what is missing)") from None
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot reach the controller service at {self.path}: {exc}") from None
        return sock

    def stream(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send one request and yield its answers; raises the error a failed one carries."""
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            with sock.makefile("rb") as lines:
                for line in lines:
                    reply = json.loads(line)
                    if reply.get("ok") is False:
                        raise remote_error(reply)
                    yield reply
                    if reply.get("end", True):
                        return
        except TimeoutError:
            raise ControlError(f"the controller service did not answer {op!r} within {self.timeout:g} s; "
                               "see its log, logs/control.log in the node's home") from None
        finally:
            sock.close()
        raise ControlError(f"the controller service closed the connection during {op!r}; "
                           "see logs/control.log")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request, one answer."""
        return next(self.stream(op, **args))
