"""The agent's runners: sandboxed processes that run user code, one job each.

A :class:`RunnerPool` keeps warm spares: runners started in their sandboxes
(:mod:`ipdc.spawn`) before any job needs one, holding nothing of a job. A spare is
bound to a job by sending it the job's code through its channel (a few ms, where a
cold sandbox takes tens); the agent does so as soon as the job's code is in, and
when a task finds none of the job's runners idle. A runner then serves that job
only, and is killed when the job is dropped.

Limits (the ``sandbox`` section of ipdc.conf) become the sandbox's limits: its
memory, pids and CPU cgroup, rlimits, the size of its /job, a wall-clock timeout
per task. A runner that overruns one, breaks its protocol (a message over the cap)
or is dropped is killed with every process it started, and the task is reported as
failed with the limit and the setting to change; the agent and the pool live on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from ipdc.config import SandboxSection
from ipdc.errors import SandboxError, TaskFailed
from ipdc.spawn import Limits, Sandbox, SandboxedProcess, SandboxSpec
from ipdc.wire import fdmsg
from ipdc.wire.getresult import clip

log = logging.getLogger(__name__)

#: Environment variables a TF server may inherit; everything else (secrets included) is dropped.
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONHASHSEED", "TMPDIR")
#: Seconds to wait for a fresh runner's first message.
START_TIMEOUT = 60.0
#: How many cleaned-up jobs a pool remembers, so a straggling task of one gets no runner.
DROPPED_JOBS = 4096
RUNNER_MODULE = "ipdc.runner.process"


def runner_spec(settings: SandboxSection) -> SandboxSpec:
    """The sandbox of every runner: the node's ``sandbox`` settings."""
    limits = Limits(memory_mb=settings.memory_mb, address_space_mb=settings.memory_mb,
                    max_pids=settings.max_pids, cpu_percent=settings.cpu_percent,
                    cpu_seconds=settings.cpu_seconds, disk_mb=settings.disk_mb, file_mb=settings.file_mb,
                    nice=settings.nice)
    named = {"cpu_seconds": settings.cpu_seconds, "memory_mb": settings.memory_mb,
             "file_mb": settings.file_mb, "disk_mb": settings.disk_mb}  # the settings its failures name
    return SandboxSpec(module=RUNNER_MODULE, name="runner", args=(json.dumps(named),), limits=limits,
                       ro_dirs=tuple(settings.shared_dirs))


class Runner:
    """The agent's handle on one runner: its sandbox, and the job it is bound to."""

    def __init__(self, process: SandboxedProcess, settings: SandboxSection) -> None:
        self.process = process
        self.settings = settings
        self.job: str | None = None
        self.started = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()

    def kill(self) -> None:
        self.process.kill()

    def wait_ready(self) -> None:
        try:
            got = self.process.recv(START_TIMEOUT)
        except (TimeoutError, SandboxError):
            got = None
        if got is None or not got[0].get("ready"):
            self.kill()
            raise TaskFailed(f"a runner failed to start ({self.process.ended_by()}); see runners.log")
        fdmsg.close_all(got[1])
        self.started = True

    def call(self, request: dict[str, Any], fds: list[int],
             timeout: float) -> tuple[dict[str, Any], list[int]]:
        """Send one request (``fds`` stay ours) and wait for its answer; TaskFailed on failure."""
        op = str(request.get("op"))
        what = "loading the job's code" if op == "load" else f"the {op} task"
        try:
            self.process.send(request, fds)
            got = self.process.recv(timeout)
        except TimeoutError:
            self.kill()
            forks = (f"; it also reached the limit of {self.settings.max_pids} processes (sandbox.max_pids)"
                     if self.process.hit_pids_max else "")
            raise TaskFailed(f"{what} was killed after {timeout:g} s wall-clock "
                             f"(sandbox.task_timeout){forks}") from None
        except SandboxError as exc:
            self.kill()
            raise TaskFailed(f"{what} failed: {exc}") from None
        except OSError:
            got = None
        if got is None:
            self.kill()
            raise TaskFailed(self._death(what))
        reply, out = got
        if not reply.get("ok"):
            fdmsg.close_all(out)
            if reply.get("fatal"):  # the runner exits after a limit: never hand it out again
                self.kill()
            raise TaskFailed(clip(str(reply.get("error", "task failed"))),
                             remote_traceback=clip(str(reply.get("traceback", ""))))
        return reply, out

    def _death(self, what: str) -> str:
        """Why the runner ended in the middle of a request (after kill()), naming the limit it hit."""
        box, process = self.settings, self.process
        ended = process.ended_by()
        if process.oom_killed:
            return (f"{what} was killed by the kernel at the memory limit of {box.memory_mb} MB "
                    f"(sandbox.memory_mb; its /job files count too)")
        if process.cpu >= box.cpu_seconds and ended.startswith("killed by"):
            return f"{what} exceeded the CPU-time limit of {box.cpu_seconds} s (sandbox.cpu_seconds)"
        if process.hit_pids_max:
            return (f"{what} reached the limit of {box.max_pids} processes (sandbox.max_pids) "
                    f"and its runner died ({ended})")
        return (f"the runner process of {what} ended ({ended}): the code exited, crashed the interpreter "
                f"or hit a sandbox limit (sandbox.memory_mb = {box.memory_mb} MB, "
                f"sandbox.cpu_seconds = {box.cpu_seconds} s)")


class RunnerPool:
    """Warm spare runners, and the runners bound to each job."""

    def __init__(self, settings: SandboxSection, sandbox: Sandbox, warm: int) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.spec = runner_spec(settings)
        self.warm = warm
        self._spares: list[Runner] = []
        self._idle: dict[str, list[Runner]] = {}
        self._busy: set[Runner] = set()
        self._dropped: OrderedDict[str, None] = OrderedDict()
        """Jobs cleaned up here, newest last."""
        self._binding: dict[str, threading.Event] = {}
        """Jobs a runner is being bound to right now; set when the bind is over."""
        self._lock = threading.Lock()
        self._closed = False
        self._refill = threading.Event()
        self._refill.set()
        self._refiller = threading.Thread(target=self._keep_spares, daemon=True, name="runner-spares")
        self._refiller.start()

    def _start(self) -> Runner:
        try:
            return Runner(self.sandbox.start(self.spec), self.settings)
        except SandboxError as exc:
            raise TaskFailed(f"could not start a runner on this node: {exc}") from None

    def _keep_spares(self) -> None:
        """Start spares whenever one was taken, off the path of the task that took it."""
        while True:
            self._refill.wait()
            self._refill.clear()
            with self._lock:
                if self._closed:
                    return
                dead = [r for r in self._spares if not r.alive()]
                self._spares = [r for r in self._spares if r.alive()]
                wanted = self.warm - len(self._spares)
            for runner in dead:
                runner.kill()
            for _ in range(wanted):
                try:
                    runner = self._start()
                except TaskFailed as exc:  # the next acquire starts its own runner and reports it
                    log.warning("no warm spare runner: %s", exc)
                    break
                if not self._add_spare(runner):
                    runner.kill()
                    return

    def _add_spare(self, runner: Runner) -> bool:
        """Keep ``runner`` as a spare; False when the pool has closed meanwhile."""
        with self._lock:
            if not self._closed:
                self._spares.append(runner)
            return not self._closed

    def acquire(self, job: str, code: dict[str, bytes], partitions: int,
                stages: dict[str, Any] | None = None) -> Runner:
        """A runner bound to ``job``: an idle one of the job, else a spare (or a fresh one)
        bound now by sending it ``code`` (file name -> bytes) and what runs each stage
        (the manifest's ``params["stages"]``; None: Map.py and Reduce.py).

        While another runner of the job is being bound (the agent binds one when the job's
        code is in), a task waits for it rather than take another spare: the bind takes
        milliseconds, and a spare taken now would leave the next job to a cold start.
        """
        while True:
            dead: list[Runner] = []
            bound: threading.Event | None = None
            with self._lock:
                if job in self._dropped:
                    raise TaskFailed(f"job {job} was cleaned up on this node; its task is not run")
                idle = self._idle.get(job, [])
                while idle and not idle[-1].alive():
                    dead.append(idle.pop())
                runner = idle.pop() if idle else None
                binding = self._binding.get(job) if runner is None else None
                if runner is None and binding is None:  # this call binds one
                    # the oldest spare first: a spare joins the list as soon as it is started,
                    # so the newest may still be starting (py-spy: binds waited in wait_ready)
                    while self._spares and not self._spares[0].alive():
                        dead.append(self._spares.pop(0))
                    runner = self._spares.pop(0) if self._spares else None
                    self._refill.set()
                    self._binding[job] = bound = threading.Event()
                if runner is not None:
                    runner.job = job  # from now on, drop(job) finds and kills it, even mid-bind
                    self._busy.add(runner)
            for ended in dead:
                ended.kill()
            if binding is not None:
                binding.wait(START_TIMEOUT)
                continue
            if bound is None:
                assert runner is not None
                return runner  # an idle runner of the job
            try:
                return self._bind(runner, job, code, partitions, stages)
            finally:
                with self._lock:
                    del self._binding[job]
                bound.set()

    def _bind(self, runner: Runner | None, job: str, code: dict[str, bytes], partitions: int,
              stages: dict[str, Any] | None) -> Runner:
        """Send ``code`` to ``runner`` (a spare; a fresh one when None) for ``job``."""
        if runner is None:
            runner = self._start()
            with self._lock:
                runner.job = job
                self._busy.add(runner)
                dropped = job in self._dropped
            if dropped:
                self.discard(runner)
                raise TaskFailed(f"job {job} was cleaned up on this node; its task is not run")
        try:
            if not runner.started:
                runner.wait_ready()
            memfds = [fdmsg.sealed_memfd([data], name) for name, data in code.items()]
            try:
                runner.call({"op": "load", "job": job, "partitions": partitions, "files": list(code),
                             "stages": stages}, memfds, timeout=self.settings.task_timeout)
            finally:
                fdmsg.close_all(memfds)
        except Exception:
            self.discard(runner)
            raise
        return runner

    def release(self, runner: Runner) -> None:
        with self._lock:
            self._busy.discard(runner)
            if runner.job is not None and runner.job not in self._dropped and runner.alive():
                self._idle.setdefault(runner.job, []).append(runner)
                return
        runner.kill()

    def discard(self, runner: Runner) -> None:
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
        self._refiller.join(timeout=30)
        for runner in runners:
            runner.kill()

