"""Runner processes for user code, and the limits they run under.

A :class:`RunnerPool` starts one fork server (the zygote, ``python -m ipdc.runner``,
see its docstring) with an environment that holds none of the node's variables (so
no broker password), and asks it for runners. A runner is forked in milliseconds,
applies its limits before any user code loads, and serves exactly one job, so the
code of two jobs never shares a process. Warm spares are forked ahead of need; a
spare is bound to a job when its agent asks for one (the agent does as soon as the
job's code is in, and when a task finds none of the job's runners idle).

Limits (the ``sandbox`` section of ipdc.conf): rlimits on CPU time, address space and
file size, nice, a wall-clock timeout per task, and a pids cgroup per runner with
``pids.max``. The cgroup is what contains a fork bomb: RLIMIT_NPROC does not bind
root. cgroup v1 (a ``pids`` hierarchy) and v2 (``pids`` in ``cgroup.controllers``)
both work; where neither is writable the pool logs once that fork bombs are not
contained. A runner that overruns or is dropped is killed with every process of its
cgroup (or its process group, without one), and the task is reported as failed with
the limit and the setting to change; the agent and the pool live on.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ipdc.config import SandboxSection
from ipdc.errors import TaskFailed
from ipdc.spawn import pid_alive, wait_for

log = logging.getLogger(__name__)

#: Environment variables a runner may inherit; everything else (secrets included) is dropped.
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONHASHSEED", "TMPDIR")
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
#: Seconds to wait for the zygote, a fresh runner or a killed cgroup before giving up.
START_TIMEOUT = 60.0
KILL_TIMEOUT = 10.0
#: How many cleaned-up jobs a pool remembers, so a straggling task of one gets no runner.
DROPPED_JOBS = 4096
#: Pool cgroups are named ipdc-<agent pid>-<n>; a group whose agent is dead is stale.
POOL_GROUP = re.compile(r"ipdc-(\d+)-\d+")
_pool_numbers = itertools.count()


# -- pids cgroups ---------------------------------------------------------------------------
class PidsCgroups:
    """The pool's pids cgroup, holding one child group per runner."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._numbers = itertools.count()

    @classmethod
    def create(cls) -> tuple[PidsCgroups | None, str]:
        """The pool's group under a writable pids hierarchy, or None and the reason there is none."""
        found = pids_hierarchy()
        if found is None:
            return None, "no pids cgroup hierarchy is mounted (v1 'pids', or v2 with 'pids' in cgroup.controllers)"
        base, version = found
        _remove_stale_groups(base)
        root = base / f"ipdc-{os.getpid()}-{next(_pool_numbers)}"
        try:
            if version == 2 and "pids" not in (base / "cgroup.subtree_control").read_text().split():
                (base / "cgroup.subtree_control").write_text("+pids")
            root.mkdir()
            if version == 2:
                (root / "cgroup.subtree_control").write_text("+pids")
            probe = cls(root)
            probe.remove(probe.new_group(1))
        except OSError as exc:
            try:
                _rmdir(root)
            except OSError:
                pass
            return None, f"cannot use the pids cgroup at {base} ({exc})"
        return cls(root), ""

    def new_group(self, max_pids: int) -> Path:
        """An empty group for one runner, with ``pids.max``."""
        group = self.root / f"r{next(self._numbers)}"
        group.mkdir()
        try:
            (group / "pids.max").write_text(str(max_pids))
        except OSError:
            _rmdir(group)
            raise
        return group

    @staticmethod
    def hit_max(group: Path) -> bool:
        """Whether a fork in ``group`` was ever refused because of ``pids.max``."""
        try:
            for line in (group / "pids.events").read_text().splitlines():
                name, _, count = line.partition(" ")
                if name == "max" and int(count) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self, group: Path) -> None:
        """SIGKILL every process of ``group`` until it is empty, then delete it."""
        if not group.exists():
            return
        kill_file = group / "cgroup.kill"  # cgroup v2, Linux 5.14+: the kernel kills the lot
        if kill_file.exists():
            try:
                kill_file.write_text("1")
            except OSError:
                pass
        # Kill until no member is left (a dying fork bomb may still fork), then delete;
        # a runner joining its group just now makes rmdir fail, and the loop goes on.
        try:
            if wait_for(lambda: _kill_members(group) and _rmdir(group), KILL_TIMEOUT, 0.002):
                return
        except OSError as exc:
            log.error("could not empty and remove %s: %s", group, exc)
            return
        log.error("could not empty and remove %s within %.0f s (members: %s)",
                  group, KILL_TIMEOUT, _members(group))

    def close(self) -> None:
        """Remove every runner's group, then the pool's."""
        for group in self.root.glob("r*"):
            self.remove(group)
        try:
            _rmdir(self.root)
        except OSError as exc:
            log.error("could not remove %s: %s", self.root, exc)


def pids_hierarchy() -> tuple[Path, int] | None:
    """Where new pids cgroups can go: (directory, cgroup version), v1 preferred."""
    v2: Path | None = None
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in mountinfo:
        fields, _, tail = line.partition(" - ")
        parts, fs = fields.split(), tail.split()
        if len(parts) < 5 or len(fs) < 3:
            continue
        if fs[0] == "cgroup" and "pids" in fs[2].split(","):
            mount_root, mount_point = Path(parts[3]), Path(parts[4])
            for entry in own:  # nest under our own group, so an admin's limit on us still holds
                _, controllers, path = entry.split(":", 2)
                if "pids" in controllers.split(",") and Path(path).is_relative_to(mount_root):
                    return mount_point / Path(path).relative_to(mount_root), 1
            return mount_point, 1
        if fs[0] == "cgroup2" and v2 is None:
            v2 = Path(parts[4])
    if v2 is not None:
        try:
            if "pids" in (v2 / "cgroup.controllers").read_text().split():
                # The top of the hierarchy: below it, a group that holds processes (ours)
                # may not hand controllers to child groups.
                return v2, 2
        except OSError:
            pass
    return None


def _members(group: Path) -> list[int]:
    try:
        return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _kill_members(group: Path) -> bool:
    """SIGKILL every member of ``group``; True when it had none left."""
    pids = _members(group)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return not pids


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


def _remove_stale_groups(base: Path) -> None:
    """Empty and delete the pool groups of agents that died without closing their pool."""
    try:
        candidates = [p for p in base.iterdir() if POOL_GROUP.fullmatch(p.name)]
    except OSError:
        return
    for pool in candidates:
        owner = int(POOL_GROUP.fullmatch(pool.name).group(1))  # type: ignore[union-attr]
        if pid_alive(owner):
            continue
        PidsCgroups(pool).close()


# -- runners and the zygote -------------------------------------------------------------------
class RunnerProcess:
    """The agent's handle on one forked runner: its socket, pid, cgroup and end."""

    def __init__(self, settings: SandboxSection, cgroups: PidsCgroups | None) -> None:
        self.settings = settings
        self.cgroups = cgroups
        self.group = cgroups.new_group(settings.max_pids) if cgroups is not None else None
        self.sock, self.child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.job: str | None = None
        self.pid: int | None = None
        self.status: int | None = None
        """The wait status, once the zygote has reaped the runner."""
        self.cpu = 0.0
        self.exited = threading.Event()
        self.fork_error = ""
        self.forked_out = False
        """Whether a fork in the runner's cgroup was refused (``pids.max``), noted before removal."""
        self._buffer = bytearray()

    # called by the zygote's reader thread
    def forked(self, pid: int) -> None:
        self.pid = pid

    def ended(self, status: int | None, cpu: float, error: str = "") -> None:
        self.status, self.cpu, self.fork_error = status, cpu, error
        self.exited.set()
        if status is not None:  # what the runner started dies with it, and with them our socket's last peer
            threading.Thread(target=self._kill_processes, daemon=True, name=f"runner-{self.pid}-end").start()

    def _read_reply(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON line, None at end of stream; TimeoutError past ``deadline``."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise
            except OSError:  # closed by kill() from another thread
                return None
            if not data:
                return None
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            reply = json.loads(line)
        except ValueError:
            log.warning("runner %s wrote a malformed reply: %r", self.pid, line[:200])
            return None
        return reply if isinstance(reply, dict) else None

    def wait_ready(self, timeout: float) -> None:
        try:
            reply = self._read_reply(time.monotonic() + timeout)
        except TimeoutError:
            reply = None
        if reply is None or not reply.get("ready"):
            self.kill()
            raise TaskFailed(f"a runner failed to start ({self._end()}); see runners.log")

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait for its answer; raise TaskFailed on failure."""
        op = str(request.get("op"))
        what = "loading the job's code" if op == "bind" else f"the {op} task"
        deadline = time.monotonic() + timeout
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            reply = self._read_reply(deadline)
        except TimeoutError:
            forks = (f"; it also reached the limit of {self.settings.max_pids} processes "
                     "(sandbox.max_pids)") if self._hit_max_pids() else ""
            self.kill()
            raise TaskFailed(f"{what} was killed after {timeout:g} s wall-clock "
                             f"(sandbox.task_timeout){forks}") from None
        except OSError:
            reply = None
        if reply is None:
            self.kill()
            raise TaskFailed(self._death(what))
        if not reply.get("ok"):
            if reply.get("fatal"):  # the runner exits after a limit: never hand it out again
                self.kill()
            raise TaskFailed(str(reply.get("error", "task failed")),
                             remote_traceback=str(reply.get("traceback", "")))
        return reply

    def _hit_max_pids(self) -> bool:
        return self.forked_out or (self.group is not None and PidsCgroups.hit_max(self.group))

    def _death(self, what: str) -> str:
        """Why the runner ended in the middle of a request (after kill()), naming the limit it hit."""
        box = self.settings
        status = self.status
        signum = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else 0
        if signum in (signal.SIGXCPU, signal.SIGKILL) and self.cpu >= box.cpu_seconds:
            return f"{what} exceeded the CPU-time limit of {box.cpu_seconds} s (sandbox.cpu_seconds)"
        if self.forked_out:
            return (f"{what} reached the limit of {box.max_pids} processes (sandbox.max_pids) "
                    f"and its runner died ({self._end()})")
        return (f"the runner process of {what} ended ({self._end()}): the code exited, crashed the "
                f"interpreter or hit a sandbox limit (sandbox.memory_mb = {box.memory_mb} MB, "
                f"sandbox.cpu_seconds = {box.cpu_seconds} s)")

    def _end(self) -> str:
        if self.fork_error:
            return self.fork_error
        if not self.exited.wait(2.0) or self.status is None:
            return "no exit status"
        if os.WIFSIGNALED(self.status):
            return f"killed by {signal.Signals(os.WTERMSIG(self.status)).name}"
        return f"exit code {os.WEXITSTATUS(self.status)}"

    def alive(self) -> bool:
        return not self.exited.is_set() and self.sock.fileno() >= 0

    def _kill_processes(self) -> None:
        if self.group is not None and self.cgroups is not None:
            self.forked_out = self._hit_max_pids()
            self.cgroups.remove(self.group)
        elif self.pid is not None:
            try:  # the runner leads its own process group, which outlives it while a member lives
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Kill the runner and everything it started; return once they are gone."""
        self._kill_processes()
        if self.pid is not None and not self.exited.wait(KILL_TIMEOUT):
            log.error("runner %d did not end within %.0f s of SIGKILL", self.pid, KILL_TIMEOUT)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a task thread still waiting for a reply
        except OSError:
            pass
        self.sock.close()
        self.child_end.close()


class ZygoteProcess:
    """The agent's end of the fork server: sends fork requests, tracks their runners."""

    def __init__(self, settings: SandboxSection, log_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
        env["PYTHONPATH"] = PACKAGE_ROOT
        env["PYTHONUNBUFFERED"] = "1"
        env["IPDC_LIMITS"] = json.dumps(dataclasses.asdict(settings))
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "runners.log", "ab") as err, theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ipdc.runner", str(theirs.fileno())], stdin=subprocess.DEVNULL,
                stdout=err, stderr=err, env=env, cwd=log_dir, pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        self._ids = itertools.count()
        self._pending: dict[int, RunnerProcess] = {}
        self._running: dict[int, RunnerProcess] = {}
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._read, daemon=True, name=f"zygote-{self.proc.pid}").start()

    def fork(self, runner: RunnerProcess) -> None:
        """Ask for ``runner`` to be forked; its socket answers once it runs (or closes)."""
        with self._lock:
            number = next(self._ids)
            self._pending[number] = runner
            request = {"op": "fork", "id": number, "cgroup": str(runner.group or "")}
            try:
                socket.send_fds(self.control, [json.dumps(request).encode()], [runner.child_end.fileno()])
            except OSError:
                self._pending.pop(number)
                runner.ended(None, 0.0, "the runner zygote is not running; see runners.log")
        runner.child_end.close()

    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def _read(self) -> None:
        while True:
            try:
                data = self.control.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            with self._lock:
                if "forked" in message:
                    runner = self._pending.pop(message["forked"])
                    runner.forked(message["pid"])
                    self._running[message["pid"]] = runner
                elif "failed" in message:
                    self._pending.pop(message["failed"]).ended(None, 0.0, str(message["error"]))
                elif "exited" in message:
                    ended = self._running.pop(message["exited"], None)
                    if ended is not None:
                        ended.ended(int(message["status"]), float(message["cpu"]))
        with self._lock:
            self._closed = True
            lost = list(self._pending.values()) + list(self._running.values())
            self._pending.clear()
            self._running.clear()
        for runner in lost:  # the zygote's death SIGKILLed them (PR_SET_PDEATHSIG)
            runner.ended(None, 0.0, "the runner zygote exited; see runners.log")

    def close(self) -> None:
        """Closing our end makes the zygote kill what is left of its runners and exit."""
        try:
            self.control.shutdown(socket.SHUT_RDWR)  # also wakes our reader thread
        except OSError:
            pass
        self.control.close()
        try:
            self.proc.wait(timeout=KILL_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RunnerPool:
    """Warm spare runners, and the runners bound to each job."""

    def __init__(self, settings: SandboxSection, log_dir: Path, warm: int) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.warm = warm
        self.cgroups, reason = PidsCgroups.create()
        if self.cgroups is None:
            root = " and RLIMIT_NPROC does not bind root" if os.geteuid() == 0 else ""
            log.warning("fork bombs in user code are not contained: %s%s. Give the agent a writable "
                        "pids cgroup hierarchy (e.g. /sys/fs/cgroup/pids) to enforce sandbox.max_pids.",
                        reason, root)
        self._zygote = ZygoteProcess(settings, log_dir)
        self._spares: list[RunnerProcess] = []
        self._idle: dict[str, list[RunnerProcess]] = {}
        self._busy: set[RunnerProcess] = set()
        self._dropped: OrderedDict[str, None] = OrderedDict()
        """Jobs cleaned up here, newest last."""
        self._lock = threading.Lock()
        self._closed = False
        self._refill = threading.Event()
        self._refill.set()
        self._refiller = threading.Thread(target=self._keep_spares, daemon=True, name="runner-spares")
        self._refiller.start()

    def _fork(self) -> RunnerProcess:
        """A new runner from the zygote (restarted first if it died). Call with the lock held."""
        try:
            if not self._zygote.alive():
                log.warning("the runner zygote exited (%s); starting a new one", self._zygote.proc.poll())
                self._zygote.close()
                self._zygote = ZygoteProcess(self.settings, self.log_dir)
            runner = RunnerProcess(self.settings, self.cgroups)
        except OSError as exc:
            raise TaskFailed(f"could not start a runner process on this node: {exc}") from None
        self._zygote.fork(runner)
        return runner

    def _keep_spares(self) -> None:
        """Fork spares whenever one was taken, off the path of the task that took it."""
        while True:
            self._refill.wait()
            self._refill.clear()
            dead: list[RunnerProcess] = []
            with self._lock:
                if self._closed:
                    return
                dead = [r for r in self._spares if not r.alive()]
                self._spares = [r for r in self._spares if r.alive()]
                try:
                    while len(self._spares) < self.warm:
                        self._spares.append(self._fork())
                except TaskFailed as exc:  # the next acquire forks its own runner and reports it
                    log.warning("no warm spare runner: %s", exc)
            for runner in dead:
                runner.kill()

    def acquire(self, job: str, bind: dict[str, Any]) -> RunnerProcess:
        """A runner bound to ``job``: an idle one of the job, else a fresh one bound now."""
        dead: list[RunnerProcess] = []
        fresh: RunnerProcess | None = None
        with self._lock:
            if job in self._dropped:
                raise TaskFailed(f"job {job} was cleaned up on this node; its task is not run")
            idle = self._idle.get(job, [])
            while idle and not idle[-1].alive():
                dead.append(idle.pop())
            if idle:
                runner = idle.pop()
            else:
                while self._spares and not self._spares[-1].alive():
                    dead.append(self._spares.pop())
                runner = fresh = self._spares.pop() if self._spares else self._fork()
                runner.job = job  # from now on, drop(job) finds and kills it, even mid-bind
                self._refill.set()
            self._busy.add(runner)
        for ended in dead:
            ended.kill()
        if fresh is None:
            return runner
        try:
            fresh.wait_ready(timeout=START_TIMEOUT)
            fresh.call({"op": "bind", "job": job, **bind}, timeout=self.settings.task_timeout)
        except Exception:
            self.discard(fresh)
            raise
        return fresh

    def release(self, runner: RunnerProcess) -> None:
        with self._lock:
            self._busy.discard(runner)
            if runner.job is not None and runner.job not in self._dropped and runner.alive():
                self._idle.setdefault(runner.job, []).append(runner)
                return
        runner.kill()

    def discard(self, runner: RunnerProcess) -> None:
        with self._lock:
            self._busy.discard(runner)
        runner.kill()

    def drop(self, job: str) -> None:
        """Kill every runner of ``job`` (its CleanUp, or the job failed); a task of the job
        that comes later gets no runner."""
        with self._lock:
            self._dropped[job] = None
            while len(self._dropped) > DROPPED_JOBS:
                self._dropped.popitem(last=False)
            runners = self._idle.pop(job, [])
            runners += [r for r in self._busy if r.job == job]
            self._busy.difference_update(runners)
        for runner in runners:
            runner.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            runners = self._spares + list(self._busy) + [r for rs in self._idle.values() for r in rs]
            self._spares, self._idle, self._busy = [], {}, set()
        self._refill.set()
        self._refiller.join(timeout=KILL_TIMEOUT)
        for runner in runners:
            runner.kill()
        self._zygote.close()
        if self.cgroups is not None:
            self.cgroups.close()
