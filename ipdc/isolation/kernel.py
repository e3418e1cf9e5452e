"""The few Linux process controls the standard library lacks (prctl through libc)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}) failed")


def make_undumpable() -> None:
    """Not dumpable: another process of the same uid (a sandbox of a non-root agent, were
    it ever to reach this pid) cannot ptrace this one or read its /proc/PID/{mem,environ,
    cwd,root,fd}; those files then belong to root."""
    prctl(PR_SET_DUMPABLE, 0)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process: a zombie has exited, only its parent has not
    reaped it yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
