"""A hostile Map.py: every way out of its sandbox we could think of, tried from user code.

tests/integration/test_hostile.py submits it as a job's Map.py, with ``PARAMS`` filled
in (the nodes' homes, the agents' pids, kubo's and the broker's ports, a nonce). Each
attempt adds one ``"attempt: what it saw"`` key to the map output, so the job's part
files record exactly what the code saw; the test then says which observations mean
the attempt failed. Nothing here is a secret: the code is only told where secrets are.
"""

import ctypes
import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

PARAMS: dict[str, Any] = {}  # filled in by the test

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SECRET_FILES = ("ipdc.conf", "keys/submitter.key", "keys/kubo-api.secret", "trusted_keys",
                "kubo/swarm.key", "kubo/config")
PTRACE_ATTACH = 16
Seen = Callable[[str, str], None]
SYS_PROCESS_VM_READV, SYS_PIDFD_OPEN, SYS_KEYCTL = 310, 434, 250
CLONE_NEWUSER, MS_REMOUNT, MS_BIND = 0x10000000, 32, 4096


def why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def last_errno() -> str:
    number = ctypes.get_errno()
    return errno.errorcode.get(number, str(number))


def read(path: str) -> str:
    """'read N bytes' or why not."""
    try:
        with open(path, "rb") as f:
            return f"read {len(f.read(1 << 20))} bytes"
    except Exception as exc:  # any way it fails is an observation
        return why(exc)


def pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def attempts(seen: Seen) -> None:
    p = PARAMS
    # kill(-1): every process we may signal; the agents, the other job and kubo must live on
    try:
        os.kill(-1, signal.SIGKILL)
        seen("kill(-1, SIGKILL)", "sent")
    except OSError as exc:
        seen("kill(-1, SIGKILL)", why(exc))

    for home in p["homes"]:
        for name in SECRET_FILES:
            seen(f"read <home>/{name} by path", read(os.path.join(home, name)))
        seen("list <home>", why_list(home))
    seen("uid inside", str(os.getuid()))
    for pid in {os.getppid(), 1, *p["agents"]}:
        for home in p["homes"]:
            for route in ("cwd/../ipdc.conf", "cwd/ipdc.conf", f"root{home}/ipdc.conf"):
                seen(f"open /proc/<ppid, 1 or agent>/{route.replace(home, '<home>')}",
                     read(f"/proc/{pid}/{route}"))

    visible = pids()
    seen("processes visible in /proc", str(len(visible)))
    for pid in visible:
        seen("/proc/*/environ holds", ",".join(sorted(environ_keys(pid))) or "nothing readable")
        for home in p["homes"]:
            seen("/proc/*/root<home>/ipdc.conf", read(f"/proc/{pid}/root{home}/ipdc.conf"))
        try:
            top = sorted(os.listdir(f"/proc/{pid}/root/"))
            seen("/proc/*/root is", "the host's /" if "root" in top or "home" in top else "the sandbox's /")
        except OSError as exc:
            seen("/proc/*/root is", why(exc))

    for home in p["homes"]:
        agent = p["agents"][0]
        for target in (os.path.join(home, "trusted_keys"), f"/proc/{agent}/cwd/../trusted_keys",
                       "/proc/1/cwd/../trusted_keys"):
            try:
                with open(target, "a") as f:
                    f.write("ed25519:AAAA-attacker\n")
                seen("append to trusted_keys", "WROTE")
            except Exception as exc:  # any way it fails is an observation
                seen("append to trusted_keys", why(exc))

    for name, host, port in p["targets"]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
            seen(f"connect to {name}", "CONNECTED")
        except OSError as exc:
            seen(f"connect to {name}", why(exc))
        finally:
            s.close()
    with open("/proc/net/dev") as f:
        seen("network interfaces", ",".join(sorted(line.split(":")[0].strip() for line in f.readlines()[2:])))

    for pid in p["agents"]:
        try:
            os.kill(pid, 0)
            seen("kill(agent, 0)", "signalled")
        except OSError as exc:
            seen("kill(agent, 0)", why(exc))
        attached = libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0
        seen("ptrace(ATTACH, agent)", "ATTACHED" if attached else last_errno())
        fd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
        seen("pidfd_open(agent)", "got one" if fd >= 0 else last_errno())
    attached = libc.ptrace(PTRACE_ATTACH, 1, None, None) == 0
    seen("ptrace(ATTACH, own pid 1)", "ATTACHED" if attached else last_errno())
    seen("keyctl(session keyring)", "got it" if libc.syscall(SYS_KEYCTL, 0, -3, 0) >= 0 else last_errno())
    seen("unshare(CLONE_NEWUSER)", "NEW USER NAMESPACE" if libc.unshare(CLONE_NEWUSER) == 0 else last_errno())
    remounted = libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None) == 0
    seen("mount -o remount,rw /", "REMOUNTED" if remounted else last_errno())
    with open("/proc/self/status") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    seen("NoNewPrivs", status["NoNewPrivs"].strip())
    seen("CapEff", status["CapEff"].strip())
    for path in ("/usr/ipdc-escape", "/ipdc-escape", "/dev/ipdc-escape", "/ipdc/lib/ipdc/escape.py"):
        try:
            with open(path, "w") as f:
                f.write("x")
            seen("write outside /job", "WROTE " + path)
        except OSError as exc:
            seen("write outside /job", why(exc))

    for pid in pids():
        seen("read the other job's /job/secret", read(f"/proc/{pid}/root/job/{p['victim_file']}"))
    seen("read the other job's /job/secret", read("/job/" + p["victim_file"]))

    fill_disk(seen)
    memory_hog(seen)
    big_messages(seen)
    daemon(seen)
    fork_bomb(seen)


def why_list(path: str) -> str:
    try:
        return f"listed {len(os.listdir(path))} entries"
    except OSError as exc:
        return why(exc)


def environ_keys(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return {entry.split(b"=", 1)[0].decode() for entry in f.read().split(b"\0") if entry}
    except OSError:
        return set()


def fill_disk(seen: Seen) -> None:
    """Write to /job (and /tmp, which lives in it) until refused."""
    for directory in ("/job", "/tmp"):
        written, path = 0, os.path.join(directory, "fill")
        try:
            with open(path, "wb") as f:
                while written < (4 << 30):
                    f.write(b"x" * (1 << 20))
                    f.flush()
                    written += 1 << 20
            seen(f"fill {directory}", "wrote 4 GB")
        except OSError as exc:
            seen(f"fill {directory}", f"{why(exc)} after {written >> 20} MB (quota {PARAMS['disk_mb']} MB)")
        os.unlink(path)


def memory_hog(seen: Seen) -> None:
    """Allocate twice the memory limit, page by page, in a child."""
    child = os.fork()
    if child == 0:
        blocks = []
        try:
            for _ in range(PARAMS["memory_mb"] * 2 // 16):
                blocks.append(bytearray(16 << 20))
        except MemoryError:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        seen("allocate 2x the memory limit", f"killed by {signal.Signals(os.WTERMSIG(status)).name}")
    else:
        seen("allocate 2x the memory limit", "MemoryError" if os.WEXITSTATUS(status) == 3 else "ALLOCATED")


def big_messages(seen: Seen) -> None:
    """A 100 MB reply line on the runner's own channel, and one on stdout."""
    channel = socket.socket(fileno=os.dup(3))
    try:
        channel.send(b"x" * (100 << 20) + b"\n")
        seen("a 100 MB message to the agent", "SENT")
    except OSError as exc:
        seen("a 100 MB message to the agent", why(exc))
    finally:
        channel.detach()
    os.write(1, b"y" * (100 << 20) + b"\n")
    seen("a 100 MB line on stdout", "written (the log keeps 1 MB of it)")


def daemon(seen: Seen) -> None:
    """setsid + double fork, a process tagged with the nonce: it must not outlive the job."""
    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 1024)
            os.execv("/usr/bin/sleep", ["ipdc-daemon-" + PARAMS["nonce"], "3600"])
        os._exit(0)
    os.waitpid(first, 0)
    seen("setsid + double fork", "daemon started")


def fork_bomb(seen: Seen) -> None:
    """Fork until refused, for two seconds; the children stay (the job's end kills them)."""
    bomber = os.fork()
    if bomber == 0:
        os.setsid()
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    deadline = time.monotonic() + 2
    refused = ""
    while time.monotonic() < deadline:
        try:
            child = os.fork()
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
        except OSError as exc:
            refused = why(exc)
    seen("fork bomb", f"{len(pids())} processes at most, then {refused or 'never refused'}")
    try:
        subprocess.run(["/usr/bin/true"], timeout=10)
        seen("fork+exec during the bomb", "ran")
    except Exception as exc:  # any way it fails is an observation
        seen("fork+exec during the bomb", why(exc))


def map_chunk(text: str) -> Iterable[tuple[str, int]]:
    observed: dict[str, int] = {}

    def seen(attempt: str, what: str) -> None:
        observed[f"{attempt}: {what}"] = 1

    try:
        attempts(seen)
    except Exception as exc:  # the output says where the attack itself broke
        seen("the attack itself", f"crashed: {exc!r}")
    return observed.items()

