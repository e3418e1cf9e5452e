"""Runner processes for user code, and the limits they run under.

Each runner is a separate process in its own session, at low CPU priority, with
rlimits on CPU time, address space and file size, a wall-clock timeout per task,
and an environment without the node's secrets. A runner that overruns is killed
with its whole process group and the task is reported as failed; the agent lives on.

Warm spares (interpreter started, IPDC imported, no user code) are kept ready, so a
task does not wait for Python to start; a spare is bound to exactly one job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ipdc.config import SandboxSection
from ipdc.errors import TaskFailed

log = logging.getLogger(__name__)

#: Environment variables a runner may inherit; everything else (secrets included) is dropped.
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONHASHSEED", "TMPDIR")
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class RunnerProcess:
    """One ``python -m ipdc.runner`` and its reply queue."""

    def __init__(self, settings: SandboxSection, log_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
        env["PYTHONPATH"] = PACKAGE_ROOT
        env["PYTHONUNBUFFERED"] = "1"
        env["IPDC_LIMITS"] = json.dumps(dataclasses.asdict(settings))
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "runners.log", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ipdc.runner"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, env=env, cwd=log_dir, start_new_session=True,
            )
        self.job: str | None = None
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"runner-{self.proc.pid}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._replies.put(json.loads(line))
            except ValueError:
                log.warning("runner %d wrote a malformed reply: %r", self.proc.pid, line[:200])
        self._replies.put(None)

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait for its answer; raise TaskFailed on failure."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise TaskFailed(f"task exceeded its time limit of {timeout:.0f}s and was killed") from None
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            self.kill()
            raise TaskFailed(f"the runner process died ({_describe_exit(self.proc)}); "
                            "the task hit a sandbox limit or crashed the interpreter")
        if not reply.get("ok"):
            raise TaskFailed(str(reply.get("error", "task failed")),
                             remote_traceback=str(reply.get("traceback", "")))
        return reply

    def wait_ready(self, timeout: float) -> None:
        reply = self._replies.get(timeout=timeout)
        if reply is None or not reply.get("ready"):
            raise TaskFailed(f"a runner failed to start ({_describe_exit(self.proc)}); see runners.log")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _describe_exit(proc: subprocess.Popen[bytes]) -> str:
    try:
        code = proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class RunnerPool:
    """Warm runners, and the runners bound to each job."""

    def __init__(self, settings: SandboxSection, log_dir: Path, warm: int) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.warm = warm
        self._spares: list[RunnerProcess] = []
        self._idle: dict[str, list[RunnerProcess]] = {}
        self._busy: set[RunnerProcess] = set()
        self._lock = threading.Lock()
        self._fill_spares()

    def _fill_spares(self) -> None:
        with self._lock:
            while len(self._spares) < self.warm:
                self._spares.append(RunnerProcess(self.settings, self.log_dir))

    def acquire(self, job: str, bind: dict[str, Any]) -> RunnerProcess:
        """A runner bound to ``job``: an idle one of the job, else a spare bound now."""
        with self._lock:
            idle = self._idle.get(job)
            if idle:
                runner = idle.pop()
                self._busy.add(runner)
                return runner
            runner = self._spares.pop() if self._spares else RunnerProcess(self.settings, self.log_dir)
            self._busy.add(runner)
        self._fill_spares()
        try:
            runner.wait_ready(timeout=60)
            runner.call({"op": "bind", "job": job, **bind}, timeout=self.settings.task_timeout)
        except Exception:
            self.discard(runner)
            raise
        runner.job = job
        return runner

    def release(self, runner: RunnerProcess) -> None:
        with self._lock:
            self._busy.discard(runner)
            if runner.job is not None and runner.proc.poll() is None:
                self._idle.setdefault(runner.job, []).append(runner)

    def discard(self, runner: RunnerProcess) -> None:
        with self._lock:
            self._busy.discard(runner)
        runner.kill()

    def drop(self, job: str) -> None:
        """Kill every runner of ``job`` (its CleanUp, or the job failed)."""
        with self._lock:
            runners = self._idle.pop(job, [])
            runners += [r for r in self._busy if r.job == job]
            self._busy.difference_update(runners)
        for runner in runners:
            runner.kill()

    def close(self) -> None:
        with self._lock:
            runners = self._spares + list(self._busy) + [r for rs in self._idle.values() for r in rs]
            self._spares, self._idle, self._busy = [], {}, set()
        for runner in runners:
            runner.kill()
