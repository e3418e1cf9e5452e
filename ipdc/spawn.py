"""A background process of a node (kubo, mosquitto, the agent), tracked by pid file.

Each service runs in its own session, so stopping it signals its whole process
group. The agent's user-code runners and TF servers run in sessions of their own
(so a runaway task can be killed as a group); the agent stops them on SIGTERM, and
each also exits by itself when its parent agent dies, so no orphan survives
``deploy.py stop``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ipdc.errors import NodeError

log = logging.getLogger(__name__)


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; True if it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Service:
    """One named background process of a node home."""

    def __init__(self, home: Path, name: str) -> None:
        self.name = name
        self.pid_file = home / "run" / f"{name}.pid"
        self.log_file = home / "logs" / f"{name}.log"

    def pid(self) -> int | None:
        """The pid of the running process, or None; a stale pid file is removed."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid_alive(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
        if (pid := self.pid()) is not None:
            raise NodeError(f"{self.name} is already running (pid {pid}); stop it first")
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        log.info("started %s (pid %d), log %s", self.name, proc.pid, self.log_file)
        return proc.pid

    def fail(self, what: str) -> NodeError:
        """Stop what we started and explain, pointing at the log."""
        tail = ""
        try:
            tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            pass
        self.stop()
        return NodeError(f"{self.name} {what}. Last lines of {self.log_file}:\n{tail}")

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM the process group, SIGKILL it after ``timeout``. True if it was running."""
        pid = self.pid()
        if pid is None:
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            if wait_for(lambda: not _group_alive(pid), wait):
                break
            log.warning("%s (pid %d) ignored %s", self.name, pid, sig.name)
        self.pid_file.unlink(missing_ok=True)
        return True


def _group_alive(pgid: int) -> bool:
    """True while any process of the group lives (the leader's children included)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
