"""Every child process IPDC starts: a node's services, and sandboxed user code.

**Services** (kubo, mosquitto, the agent): :class:`Service`, a background process
tracked by pid file, in its own session, so stopping it signals its whole process
group.

**Sandboxed processes** (a job's runners, TF servers): :class:`Sandbox` is an
agent's door to them. It holds one zygote (:mod:`ipdc.isolation.zygote`, the
single-threaded process that forks every sandbox), the agent's cgroups, the Python
sandboxes run, and what this node can and cannot contain, said once when it opens.

    sandbox = Sandbox.open_shared(home / "logs")   # the agent, at start
    process = start_sandboxed(SandboxSpec(module="ipdc.runner.tfserver", name="tf-worker-0",
                                          args=("--task", "0"),
                                          limits=Limits(memory_mb=8192, max_pids=256, address_space_mb=0),
                                          ro_dirs=("/path/to/p2p-sockets",), fds=(listener.fileno(),),
                                          env=(("TF_CPP_MIN_LOG_LEVEL", "2"),)))
    message, fds = process.recv(timeout=180) or ...   # e.g. a "ready" the server sends on fd 3
    process.kill()                                    # everything it started is gone on return

Each sandboxed process runs ``main()`` of a module of ``ipdc.runner`` under
bubblewrap (see :mod:`ipdc.isolation.bwrap` for what it sees and why bubblewrap):
own user, mount, pid, network (loopback only), IPC, UTS and cgroup namespaces, no
capabilities, a seccomp filter, no_new_privs, an empty environment but for what
the spec adds, a uid of its own when the agent is root, its own memory, pids and
CPU cgroup, rlimits, a tmpfs ``/job`` of ``limits.disk_mb`` as its only writable
place. It talks to the agent over its fd 3, a SOCK_SEQPACKET socket
(:attr:`SandboxedProcess.channel`, messages as in :mod:`ipdc.wire.fdmsg`); the
spec's ``fds`` are its fds 4, 5, ... . What it prints goes to ``runners.log``.

:meth:`SandboxedProcess.kill` SIGKILLs the sandbox's pid 1 (through a pidfd: its pid
namespace then dies whole, ``setsid`` and double forks included) and bubblewrap,
waits for them, then empties and removes the cgroups. A sandbox also dies with its
agent: the zygote kills what it started when the agent's end of its socket closes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ipdc.errors import NodeError, SandboxError
from ipdc.isolation import bwrap, interpreter
from ipdc.isolation.cgroups import CgroupPool, SandboxCgroup
from ipdc.isolation.kernel import make_undumpable, pid_alive
from ipdc.isolation.spec import Limits, SandboxSpec
from ipdc.isolation.zygote import UID_BASE
from ipdc.wire import fdmsg

__all__ = ["Limits", "Sandbox", "SandboxSpec", "SandboxedProcess", "Service", "make_undumpable",
           "pid_alive", "start_sandboxed", "wait_for"]

log = logging.getLogger(__name__)

#: The ipdc package: the zygote imports it from here, sandboxes get its user-code side.
PACKAGE = Path(__file__).resolve().parent
#: Seconds to wait for the zygote to start, or for a killed sandbox to end.
START_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
#: What the zygote's Python runs first: only the standard library and ipdc are needed.
ZYGOTE_BOOT = ("import json, sys; sys.path.insert(0, json.loads(sys.argv[2])['path']); "
               "from ipdc.isolation.zygote import main; main()")


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; True if it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class Service:
    """One named background process of a node home."""

    def __init__(self, home: Path, name: str) -> None:
        self.name = name
        self.pid_file = home / "run" / f"{name}.pid"
        self.log_file = home / "logs" / f"{name}.log"
        self.home = home

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

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None, user: str | None = None) -> int:
        """Start the service in the background; as ``user`` (and its group) when given (root only)."""
        if (pid := self.pid()) is not None:
            raise NodeError(f"{self.name} is already running (pid {pid}); stop it first")
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                # In the node's home, not wherever the command was typed: `python -m` puts the
                # working directory first on sys.path, so a source tree there would shadow
                # the installed IPDC.
                env=env, cwd=self.home, start_new_session=True, close_fds=True,
                user=user, group=pwd.getpwnam(user).pw_gid if user else None,
                extra_groups=[] if user else None,
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


# -- sandboxed processes ------------------------------------------------------------------
class SandboxedProcess:
    """The agent's handle on one sandbox: its channel, its processes, its cgroup, its end."""

    def __init__(self, spec: SandboxSpec, pid: int, uid: int, pidfd: int, info: int,
                 channel: socket.socket, cgroup: SandboxCgroup | None) -> None:
        self.spec = spec
        self.pid = pid
        """bubblewrap's monitor process, as seen outside."""
        self.uid = uid
        """The uid the sandbox's processes have outside."""
        self.channel = channel
        self.cgroup = cgroup
        self.status: int | None = None
        """bubblewrap's wait status, once it ended (it exits with its child's status)."""
        self.cpu = 0.0
        """CPU seconds of everything the sandbox ran, once it ended."""
        self.exited = threading.Event()
        self.hit_pids_max = False
        self.oom_killed = False
        """What the cgroup saw, noted before it is removed."""
        self._pidfd = pidfd
        self._info = info
        self._pid1_fd = -1
        self._pid1 = 0
        self._lock = threading.Lock()
        self._killed = False
        self._released = False

    # -- messages ---------------------------------------------------------------------
    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        fdmsg.send(self.channel, message, fds)

    def recv(self, timeout: float | None) -> tuple[dict[str, Any], list[int]] | None:
        """The next message, None once the process has closed its end (or was killed).

        TimeoutError past ``timeout``. A message over the cap, or that is not JSON, is a
        breach: the sandbox is killed and SandboxError raised.
        """
        try:
            return fdmsg.recv(self.channel, timeout)
        except SandboxError as exc:
            self.kill()
            raise SandboxError(f"the {self.spec.name} process sent {exc}; it was killed") from None
        except TimeoutError:
            raise
        except OSError:
            return None

    # -- life and death ----------------------------------------------------------------
    def alive(self) -> bool:
        return not self.exited.is_set()

    def pid1(self) -> int | None:
        """The host pid of the sandbox's pid 1 (bubblewrap's init), once bwrap reported it."""
        with self._lock:
            return self._read_pid1()

    def _read_pid1(self) -> int | None:
        if self._pid1_fd < 0 and self._info >= 0 and select.select([self._info], [], [], 0)[0]:
            data = b""
            while b"}" not in data and select.select([self._info], [], [], 1.0)[0]:
                chunk = os.read(self._info, 4096)
                if not chunk:
                    break
                data += chunk
            os.close(self._info)
            self._info = -1
            try:
                pid = int(json.loads(data)["child-pid"])
                fd = os.pidfd_open(pid)
            except (ValueError, KeyError, OSError):
                return None
            # a pidfd taken while that pid is verifiably bwrap's child: never another process
            if _parent(pid) == self.pid:
                self._pid1_fd = fd
                self._pid1 = pid
            else:
                os.close(fd)
        return self._pid1 if self._pid1_fd >= 0 else None

    def ended_by(self) -> str:
        """How the sandbox ended, in words (after ``exited`` is set)."""
        status = self.status
        if status is None:
            return "no exit status"
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        code = os.WEXITSTATUS(status)
        if code > 128 and code - 128 in signal.valid_signals():  # bwrap reports a signal as 128 + n
            return f"killed by {signal.Signals(code - 128).name}"
        return f"exit code {code}"

    def kill(self) -> None:
        """Kill everything in the sandbox; return once it is gone and its cgroup removed."""
        with self._lock:
            if not self._killed:
                self._killed = True
                self._read_pid1()
                for fd in (self._pid1_fd, self._pidfd):  # pid 1 first: its pid namespace dies whole
                    if fd >= 0:
                        try:
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        try:
            self.channel.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting for a message
        except OSError:
            pass
        if not self.exited.wait(KILL_TIMEOUT):
            log.error("sandbox %s (bwrap %d) did not end within %.0f s of SIGKILL", self.spec.name, self.pid,
                      KILL_TIMEOUT)
        self._release()
        self.channel.close()

    def _ended(self, status: int | None, cpu: float) -> None:
        """Called by the zygote's reader: bubblewrap ended (or the zygote did)."""
        self.status, self.cpu = status, cpu
        self.exited.set()
        threading.Thread(target=self._release, daemon=True, name=f"sandbox-{self.pid}-end").start()

    def _release(self) -> None:
        """Once: note what the cgroup saw, empty and remove it, close our fds."""
        with self._lock:
            if self._released:
                return
            self._released = True
            if self.cgroup is not None:
                self.hit_pids_max = self.cgroup.hit_pids_max()
                self.oom_killed = self.cgroup.oom_killed()
                try:
                    self.cgroup.remove()
                except OSError as exc:
                    log.error("%s", exc)
            for fd in (self._pid1_fd, self._pidfd, self._info):
                if fd >= 0:
                    os.close(fd)
            self._pid1_fd = self._pidfd = self._info = -1


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


class _Request:
    """A spawn request on its way: the reader thread fills in its answer."""

    def __init__(self, spec: SandboxSpec, channel: socket.socket, cgroup: SandboxCgroup | None) -> None:
        self.spec = spec
        self.channel = channel
        self.cgroup = cgroup
        self.done = threading.Event()
        self.process: SandboxedProcess | None = None
        self.error = ""


class _Zygote:
    """The agent's end of the zygote: spawn requests out, sandboxes' births and ends in."""

    def __init__(self, log_dir: Path, python: interpreter.Interpreter, separate_uid: bool) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {"path": str(PACKAGE.parent), "package": str(PACKAGE), "bwrap": bwrap.BWRAP,
                  "separate_uid": separate_uid,
                  "python": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(python).items()}}
        env = {k: os.environ[k] for k in ("LD_LIBRARY_PATH", "LANG") if k in os.environ}
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "runners.log", "ab") as out, theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", ZYGOTE_BOOT, str(theirs.fileno()), json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd="/",
                pass_fds=(theirs.fileno(),), start_new_session=True)
        self._ids = itertools.count()
        self._pending: dict[int, _Request] = {}
        self._running: dict[int, SandboxedProcess] = {}
        self._lock = threading.Lock()
        self._closed = False
        got = fdmsg.recv(self.control, START_TIMEOUT)
        if got is None or not got[0].get("ready"):
            error = got[0].get("error", "") if got else "it exited"
            self.close()
            raise SandboxError(f"the sandbox zygote did not start ({error}); see {log_dir / 'runners.log'}")
        threading.Thread(target=self._read, daemon=True, name=f"zygote-{self.proc.pid}").start()

    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def spawn(self, spec: SandboxSpec, cgroup: SandboxCgroup | None) -> SandboxedProcess:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = _Request(spec, ours, cgroup)
        try:
            with self._lock:
                number = next(self._ids)
                self._pending[number] = request
                message = {"op": "spawn", "id": number, "spec": spec.to_json(),
                           "cgroups": cgroup.procs_files() if cgroup else []}
                fdmsg.send(self.control, message, [theirs.fileno(), *spec.fds])
        except OSError as exc:
            with self._lock:
                self._pending.pop(number, None)
            ours.close()
            raise SandboxError(f"the sandbox zygote is not running ({exc}); see runners.log") from None
        finally:
            theirs.close()
        request.done.wait(START_TIMEOUT)
        with self._lock:
            self._pending.pop(number, None)
        if request.process is None:
            ours.close()
            raise SandboxError(f"the sandbox zygote could not start {spec.name}: "
                               f"{request.error or 'no answer'}; see runners.log")
        return request.process

    def _read(self) -> None:
        """The zygote's messages, in order: a sandbox is registered before its end can arrive."""
        while True:
            try:
                got = fdmsg.recv(self.control, None)
            except (OSError, SandboxError):
                got = None
            if got is None:
                break
            message, fds = got
            with self._lock:
                if "spawned" in message and len(fds) == 2 and int(message["spawned"]) in self._pending:
                    request = self._pending[int(message["spawned"])]
                    process = SandboxedProcess(request.spec, int(message["pid"]), int(message["uid"]),
                                               fds[0], fds[1], request.channel, request.cgroup)
                    self._running[process.pid] = request.process = process
                    request.done.set()
                elif "failed" in message and int(message["failed"]) in self._pending:
                    request = self._pending[int(message["failed"])]
                    request.error = str(message.get("error"))
                    request.done.set()
                elif "exited" in message and int(message["exited"]) in self._running:
                    self._running.pop(int(message["exited"]))._ended(int(message["status"]),
                                                                      float(message["cpu"]))
                else:
                    fdmsg.close_all(fds)
        with self._lock:
            self._closed = True
            lost = list(self._running.values())
            self._running.clear()
            for request in self._pending.values():
                request.done.set()
        for process in lost:  # the zygote killed them as it went (or died: PDEATHSIG did)
            process._ended(None, 0.0)

    def close(self) -> None:
        """Closing our end makes the zygote kill every sandbox it started and exit."""
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.control.close()
        try:
            self.proc.wait(timeout=KILL_TIMEOUT * 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Sandbox:
    """An agent's sandboxed processes: one zygote, one cgroup pool, one report."""

    _shared: ClassVar[Sandbox | None] = None

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.separate_uid = os.geteuid() == 0
        self.python = interpreter.for_sandbox(self.separate_uid)
        self.cgroups, missing = CgroupPool.open()
        self.unusable = _probe_bwrap(self.separate_uid)
        """Why no sandbox can start here ("" when they can)."""
        self.gaps = _gaps(self.unusable, missing, self.separate_uid)
        """What is not contained on this node, in words."""
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        if self.unusable:
            log.error("user code cannot run on this node: %s", self.unusable)
        else:
            uid = "a uid of its own" if self.separate_uid else f"uid {os.geteuid()}, the agent's"
            log.info("user code runs in bubblewrap sandboxes (%s; Python %s)", uid, self.python.executable)
            for gap in self.gaps:
                log.warning("not contained on this node: %s", gap)
            self._zygote = _Zygote(log_dir, self.python, self.separate_uid)

    @classmethod
    def open_shared(cls, log_dir: Path) -> Sandbox:
        """The sandbox of this process that :func:`start_sandboxed` uses (the agent's)."""
        cls._shared = cls(log_dir)
        return cls._shared

    def start(self, spec: SandboxSpec) -> SandboxedProcess:
        """Start ``spec`` and return at once (its process starts in tens of milliseconds)."""
        if self.unusable:
            raise SandboxError(f"user code cannot run on this node: {self.unusable}")
        with self._lock:
            if self._zygote is None:
                raise SandboxError("the sandbox is closed")
            if not self._zygote.alive():
                log.warning("the sandbox zygote exited (%s); starting a new one", self._zygote.proc.poll())
                self._zygote.close()
                self._zygote = _Zygote(self.log_dir, self.python, self.separate_uid)
            zygote = self._zygote
        cgroup = None
        if self.cgroups is not None:
            try:
                cgroup = self.cgroups.new_group(spec.name, spec.limits)
            except OSError as exc:
                raise SandboxError(f"cannot make a cgroup for {spec.name}: {exc}") from None
        try:
            return zygote.spawn(spec, cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise

    def close(self) -> None:
        """Kill every sandbox (through the zygote), then remove the cgroup pool."""
        with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()
        if self.cgroups is not None:
            self.cgroups.close()
        if Sandbox._shared is self:
            Sandbox._shared = None


def start_sandboxed(spec: SandboxSpec) -> SandboxedProcess:
    """Start ``spec`` in this process's shared sandbox (:meth:`Sandbox.open_shared`)."""
    shared = Sandbox._shared
    if shared is None:
        raise SandboxError("no sandbox is open in this process: the agent opens one at start "
                           "(ipdc.spawn.Sandbox.open_shared)")
    return shared.start(spec)


def _probe_bwrap(separate_uid: bool) -> str:
    """Why bubblewrap cannot make a sandbox under the uid sandboxes get ("" if it can):
    missing, or unprivileged user namespaces refused (a sysctl, or AppArmor)."""
    if not os.access(bwrap.BWRAP, os.X_OK):
        return f"{bwrap.BWRAP} is missing: install bubblewrap (apt-get install bubblewrap)"
    uid = UID_BASE if separate_uid else None
    argv = [bwrap.BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(bwrap.INNER_UID),
            "--gid", str(bwrap.INNER_UID), "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc",
            "--dev", "/dev", "--", "/usr/bin/true"]
    try:
        done = subprocess.run(argv, env={}, cwd="/", capture_output=True, text=True, timeout=30,
                              user=uid, group=uid, extra_groups=[] if uid is not None else None)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap failed to run ({exc})"
    if done.returncode != 0:
        return (f"bubblewrap cannot create a user namespace ({done.stderr.strip()}): enable unprivileged "
                "user namespaces (sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces, "
                "or AppArmor's kernel.apparmor_restrict_unprivileged_userns=0)")
    return ""


def _gaps(unusable: str, missing: dict[str, str], separate_uid: bool) -> list[str]:
    """What a sandbox does not contain here, one line each."""
    if unusable:
        return [f"user code does not run at all: {unusable}"]
    what = {"memory": "no memory limit (sandbox.memory_mb holds only as RLIMIT_AS, and /job's "
                      "tmpfs is charged to no cgroup)",
            "pids": "no pids limit (fork bombs are bounded by RLIMIT_NPROC inside the sandbox only)",
            "cpu": "no CPU bandwidth limit (sandbox.cpu_percent)"}
    gaps = [f"{what[c]}: {reason}" for c, reason in missing.items()]
    if not separate_uid:
        gaps.append(f"no separate uid: sandboxes run as the agent's uid {os.geteuid()} outside their "
                    "namespaces (per-user kernel counters such as pipe buffers are shared with the agent); "
                    "run the agent as root to give each sandbox a uid of its own")
    return gaps
