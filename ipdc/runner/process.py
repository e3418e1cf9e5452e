"""The processes that run user code: a fork server (zygote) and the runners it forks.

User code never runs inside the agent. Each agent's :class:`ipdc.agent.sandbox.RunnerPool`
starts one zygote, ``python -m ipdc.runner FD``: it imports everything a runner
needs once, then forks a fresh runner per request in a few milliseconds, instead of
the ~130 ms an interpreter start costs. The zygote never runs user code, and a
runner serves one job only, so no import of a job's Map.py or Reduce.py outlives
the job and two jobs never share a process.

A runner applies its limits right after the fork, before any user code loads: it
joins its own pids cgroup (made by the pool, ``sandbox.max_pids``), starts its own
session, asks to be SIGKILLed if the zygote dies, lowers its priority and sets
rlimits on CPU time, address space and file size. It then speaks JSON lines with the
agent over a socket the agent made and the zygote passed on: ``bind`` (load the
job's code), then ``map``/``reduce`` tasks. ``print`` in user code goes to
runners.log and cannot corrupt the protocol.

The zygote talks to the pool over a SOCK_SEQPACKET socket, one JSON object a packet:
``{"op": "fork", "id": N, "cgroup": PATH}`` with the runner's socket attached
(SCM_RIGHTS) is answered ``{"forked": N, "pid": P}``, and every runner's end is
reported ``{"exited": P, "status": S, "cpu": SECONDS}``. The zygote reaps all its
descendants (it is their subreaper). When the pool's end closes (the agent exited
or died), it kills its runners and exits.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import io
import json
import os
import resource
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NoReturn

from ipdc.config import SandboxSection
from ipdc.errors import IPDCError, JobError
from ipdc.kubo import EMPTY_CID, KuboClient
from ipdc.runner.mapreduce import load_module, map_pairs, reduce_partitions
from ipdc.wire.partition import PartitionError, write_partitions

#: Map outputs a reduce task fetches at once (threads count against ``sandbox.max_pids``).
FETCH_THREADS = 8
#: Seconds past ``sandbox.cpu_seconds`` (SIGXCPU, reported) before the kernel's SIGKILL.
CPU_GRACE = 5
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


# -- the runner ---------------------------------------------------------------------------
class CpuTimeExceeded(BaseException):
    """SIGXCPU: the runner used up ``sandbox.cpu_seconds``. A BaseException, so that user
    code's ``except Exception`` does not swallow it."""


def _on_sigxcpu(signum: int, frame: FrameType | None) -> NoReturn:
    raise CpuTimeExceeded


class Runner:
    """The runner's side of the protocol: one bound job, tasks in sequence."""

    def __init__(self, settings: SandboxSection, channel: socket.socket) -> None:
        self.settings = settings
        self.channel = channel
        self.pid = os.getpid()
        self.kubo: KuboClient | None = None
        self.mapper: ModuleType | None = None
        self.reducer: ModuleType | None = None
        self.partitions = 0

    def serve(self) -> None:
        ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "bind": self.bind, "map": self.map, "reduce": self.reduce}
        self._send({"ok": True, "ready": True})
        for line in self.channel.makefile("rb"):
            req = json.loads(line)
            op = str(req.get("op"))
            fatal = False
            try:
                reply = {"ok": True, **ops[op](req)}
            except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
                reply, fatal = self._failure(op, exc)
            self._only_the_runner()
            if fatal:  # the process hit a limit: it may be in no state to serve another task
                reply["fatal"] = True
            self._send(reply)
            if fatal:
                os._exit(1)

    def _send(self, reply: dict[str, Any]) -> None:
        self.channel.sendall(json.dumps(reply).encode() + b"\n")

    def _only_the_runner(self) -> None:
        """A process that user code forked and that came back into the runner's code
        must not touch the protocol or kubo: only the runner itself answers."""
        if os.getpid() != self.pid:
            os._exit(0)

    def _failure(self, op: str, exc: BaseException) -> tuple[dict[str, Any], bool]:
        """The reply for a failed request, and whether the runner must exit after it."""
        box = self.settings
        what = "loading the job's code" if op == "bind" else f"the {op} task"
        tb = traceback.format_exc()
        if isinstance(exc, CpuTimeExceeded):
            return {"ok": False, "error": f"{what} exceeded the CPU-time limit of {box.cpu_seconds} s "
                                          "(sandbox.cpu_seconds)", "traceback": tb}, True
        if isinstance(exc, MemoryError):
            return {"ok": False, "error": f"{what} exceeded the memory limit of {box.memory_mb} MB "
                                          "(sandbox.memory_mb)", "traceback": tb}, True
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            return {"ok": False, "error": f"{what} tried to write a file larger than {box.file_mb} MB "
                                          "(sandbox.file_mb)", "traceback": tb}, False
        if isinstance(exc, IPDCError):  # IPDC's own error (kubo, the data): no user traceback
            return {"ok": False, "error": str(exc)}, False
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": tb}, False

    def bind(self, req: dict[str, Any]) -> dict[str, Any]:
        hide_node_home(Path(req["dir"]))
        os.chdir(req["dir"])
        sys.path.insert(0, req["dir"])
        self.kubo = KuboClient(req["kubo"], timeout=600)
        self.partitions = int(req["partitions"])
        tag = req["job"]
        if req.get("map"):
            self.mapper = load_module(Path(req["map"]), f"ipdc_job_{tag}_map")
        if req.get("reduce"):
            self.reducer = load_module(Path(req["reduce"]), f"ipdc_job_{tag}_reduce")
        self._only_the_runner()
        return {}

    def map(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.kubo is not None and self.mapper is not None
        t0 = time.perf_counter()
        data = self.kubo.fetch(req["cid"], stall=self.settings.fetch_stall)
        t1 = time.perf_counter()
        documents = write_partitions(map_pairs(self.mapper, data.decode("utf-8", "surrogateescape")),
                                     self.partitions)
        self._only_the_runner()
        t2 = time.perf_counter()
        cids = self._store({f"part-{i}": d for i, d in enumerate(documents)})
        t3 = time.perf_counter()
        return {"cids": cids, "stats": {"fetch": t1 - t0, "map": t2 - t1, "store": t3 - t2,
                                        "bytes": float(len(data))}}

    def _fetch_all(self, cids: list[str]) -> list[bytes]:
        """Every map output of a partition, fetched side by side: each one from another
        peer is a bitswap round trip, and a job may have hundreds of map tasks."""
        assert self.kubo is not None
        kubo, stall = self.kubo, self.settings.fetch_stall
        if len(cids) == 1:
            return [kubo.fetch(cids[0], stall=stall)]
        with ThreadPoolExecutor(min(FETCH_THREADS, len(cids))) as pool:
            return list(pool.map(lambda cid: kubo.fetch(cid, stall=stall), cids))

    def _store(self, files: dict[str, bytes]) -> list[str]:
        """Add files to kubo in one request; an empty one is the empty CID without a request
        (each added file costs kubo a few ms of pinning)."""
        assert self.kubo is not None
        full = [(name, data) for name, data in files.items() if data]
        added = iter(self.kubo.add_streams([(name, io.BytesIO(data)) for name, data in full]))
        return [next(added) if data else EMPTY_CID for data in files.values()]

    def reduce(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.kubo is not None and self.reducer is not None
        t0 = time.perf_counter()
        documents = self._fetch_all(req["cids"])
        t1 = time.perf_counter()
        try:
            part = reduce_partitions(self.reducer, documents)
        except PartitionError as exc:
            raise JobError(f"a map output of this reduce task is malformed: {exc}") from None
        self._only_the_runner()
        t2 = time.perf_counter()
        (cid,) = self._store({"part": part})
        t3 = time.perf_counter()
        return {"cids": [cid], "stats": {"fetch": t1 - t0, "reduce": t2 - t1, "store": t3 - t2}}


# -- the zygote and the start of a runner -------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x2000, 0x4000, 0x40000
MNT_DETACH = 2


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {source} on {target} failed")


def hide_node_home(job_dir: Path) -> None:
    """Give this runner a private view in which the node's home holds only the job's dir.

    User code runs as the agent's user, so it could otherwise read ``ipdc.conf`` (the
    broker password), the submitter key and ``trusted_keys``, or another job's files. In
    a mount namespace of its own, the job's dir is bound aside, an empty tmpfs covers the
    home, and the job's dir is moved back into place. It needs CAP_SYS_ADMIN (a root
    agent); without it the runner goes on as before and says so in runners.log.
    """
    home = job_dir.parent.parent
    aside = Path(tempfile.mkdtemp(prefix="ipdc-job-"))
    try:
        if _libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        _mount(str(job_dir), str(aside), None, MS_BIND)
        try:
            _mount("tmpfs", str(home), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            try:
                job_dir.mkdir(parents=True)
                _mount(str(aside), str(job_dir), None, MS_MOVE)
            except OSError:
                _libc.umount2(str(home).encode(), MNT_DETACH)  # the job's dir must stay reachable
                raise
        except OSError:
            _libc.umount2(str(aside).encode(), MNT_DETACH)
            raise
    except OSError as exc:
        print(f"runner {os.getpid()}: the node's home stays visible to user code ({exc})",
              file=sys.stderr, flush=True)
    finally:
        aside.rmdir()


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _kill_cgroup(cgroup: str) -> None:
    """SIGKILL every process in ``cgroup`` until it is empty (best effort, on the way out)."""
    procs = Path(cgroup, "cgroup.procs")
    for _ in range(100):
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Zygote:
    """The fork server: one per RunnerPool, imports done once, a runner per request."""

    def __init__(self, control: socket.socket, settings: SandboxSection) -> None:
        self.control = control
        self.settings = settings
        self.pid = os.getpid()
        self.runners: dict[int, str] = {}  # pid -> its cgroup ("" when there is none)
        self._wake_r, self._wake_w = os.pipe()

    def serve(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool, not a terminal's ^C, ends us
        with selectors.DefaultSelector() as selector:
            selector.register(self.control, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            self._selector = selector
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self.control:
                        if not self._command():
                            self._shutdown()
                            return
                    else:
                        while True:
                            try:
                                if not os.read(self._wake_r, 4096):
                                    break
                            except BlockingIOError:
                                break
                        self._reap()

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.control.send(json.dumps(message).encode())
        except OSError:  # the pool is gone; the next read of the control socket ends us
            pass

    def _command(self) -> bool:
        """Serve one request from the pool; False when the pool has gone."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, 65536, 1)
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        request = json.loads(data)
        if request.get("op") != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self._send({"failed": request.get("id"), "error": "bad request to the runner zygote"})
            return True
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            self._send({"failed": request["id"], "error": f"fork failed: {exc}"})
            return True
        if pid == 0:
            self._become_runner(fds[0], str(request.get("cgroup") or ""))
        os.close(fds[0])
        self.runners[pid] = str(request.get("cgroup") or "")
        self._send({"forked": request["id"], "pid": pid})
        return True

    def _become_runner(self, channel_fd: int, cgroup: str) -> NoReturn:
        """In the child: drop the zygote's state, apply the limits, serve one job."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            self._selector.close()
            self.control.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            start_runner(self.settings, channel_fd, cgroup, zygote=self.pid)
            code = 0
        except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the zygote
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        """Wait for every ended descendant (we are their subreaper); report the runners."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.runners.pop(pid, None) is not None:
                self._send({"exited": pid, "status": status, "cpu": usage.ru_utime + usage.ru_stime})

    def _shutdown(self) -> None:
        """The pool is gone (the agent stopped or died): no runner outlives it."""
        for pid, cgroup in self.runners.items():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if cgroup:
                _kill_cgroup(cgroup)


def start_runner(settings: SandboxSection, channel_fd: int, cgroup: str, zygote: int) -> None:
    """Apply the job's limits to this fresh child of the zygote, then serve the job."""
    if cgroup:  # first: every process user code ever starts then counts against pids.max
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote:  # the zygote died before the line above took effect
        os._exit(3)
    os.nice(settings.nice)
    mb = 1 << 20
    for which, soft, hard in ((resource.RLIMIT_CPU, settings.cpu_seconds, settings.cpu_seconds + CPU_GRACE),
                              (resource.RLIMIT_AS, settings.memory_mb * mb, settings.memory_mb * mb),
                              (resource.RLIMIT_FSIZE, settings.file_mb * mb, settings.file_mb * mb),
                              (resource.RLIMIT_CORE, 0, 0)):
        _, ceiling = resource.getrlimit(which)  # without privilege a hard limit cannot rise
        if ceiling != resource.RLIM_INFINITY:
            hard = min(hard, ceiling)
        resource.setrlimit(which, (min(soft, hard), hard))
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises EFBIG instead
    Runner(settings, socket.socket(fileno=channel_fd)).serve()


def main() -> None:
    """``python -m ipdc.runner CONTROL_FD``: the zygote of one RunnerPool."""
    settings = SandboxSection(**json.loads(os.environ.pop("IPDC_LIMITS")))
    control = socket.socket(fileno=int(sys.argv[1]))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # httpx imports its transport (httpcore, ...) when the first client is made, and the
    # resolver imports the idna codec on first use: once here, not in every runner.
    KuboClient("http://127.0.0.1:1").close()
    "localhost".encode("idna")
    gc.freeze()  # the imported modules stay shared with the runners instead of being copied
    Zygote(control, settings).serve()


if __name__ == "__main__":
    main()
