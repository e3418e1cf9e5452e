"""The runner: the process in a sandbox that loads one job's code and runs its tasks.

The agent's runner pool starts runners in sandboxes (:mod:`ipdc.spawn`) before any
job needs them: a warm spare holds nothing of a job until the agent binds it to one
by sending it the job's code. From then on it serves that job only, so no import of
a job's Map.py or Reduce.py outlives the job and two jobs never share a process.

A runner has no network and no kubo client: the agent fetches every input, checks
it against its CID and hands it over as a sealed memfd, and adds the outputs the
runner hands back to kubo itself. The only channel is fd 3, with messages as in
:mod:`ipdc.wire.fdmsg`:

* runner: ``{"ready": true, "pid": P}`` once started;
* ``{"op": "load", "job": TAG, "partitions": K, "files": [NAME, ...], "stages": S}`` with
  one sealed memfd per file: the files are written to /job (the cwd, on sys.path), the
  Python files of the stages ``S`` (:mod:`ipdc.wire.stages`; absent: Map.py and
  Reduce.py) are imported and the shipped programs made executable. Answer ``{"ok": true}``.
* ``{"op": "map", "path": PATH}`` with the chunk (PATH: its input file, for a
  ``map(line, path)``, or a streaming mapper's ``mapreduce_map_input_file``): answer
  ``{"ok": true, "sizes": [K sizes], "stats": {...}}`` with one sealed memfd holding the K
  partition documents back to back.
* ``{"op": "reduce", "sizes": [...]}`` with one memfd holding the map outputs of the
  partition back to back: answer as for map, with the one part.
* ``{"op": "task", "sizes": [...], "codecs": [...], "kwargs": [...], "chunk": BOOL}`` with one
  memfd holding a Python API task's function and arguments (:mod:`ipdc.runner.pytask`):
  answer ``{"ok": true, "sizes": [n], "codec": C, "raised": BOOL, "traceback": TEXT}`` with
  the result (or what the function raised) in one sealed memfd.
* a failure: ``{"ok": false, "error": TEXT, "traceback": TEXT, "fatal": BOOL}``, its
  texts capped so the message stays under the channel's cap; after a fatal one (a
  limit was hit) the runner exits.

``print`` in user code goes to runners.log and cannot corrupt the protocol. Only the
standard library, this package and IPDC's wire formats are here (see
:data:`ipdc.isolation.bwrap.SHIPPED`).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NoReturn

from ipdc.errors import IPDCError, JobError

# ipdc.runner.streaming (Hadoop Streaming) and ipdc.runner.pytask (the Python API) are
# imported by the tasks that need them: every job takes a warm spare, every spare is a
# cold start, and imports were most of its ~100 ms of CPU (python -X importtime); a
# WordCount needs neither.
from ipdc.runner.mapreduce import load_module, map_pairs, reduce_partitions
from ipdc.wire import fdmsg
from ipdc.wire.partition import PartitionError, write_partitions
from ipdc.wire.stages import PYTHON_JOB, CommandStage, PythonStage, stages_of

#: The channel to the agent.
CHANNEL_FD = 3
#: Caps on the texts of a failure: together well under fdmsg.MAX_MESSAGE.
MAX_ERROR = 4000
MAX_TRACEBACK = 16000

Reply = tuple[dict[str, Any], list[int]]


class CpuTimeExceeded(BaseException):
    """SIGXCPU: the runner used up its CPU time. A BaseException, so that user code's
    ``except Exception`` does not swallow it."""


def _on_sigxcpu(signum: int, frame: FrameType | None) -> NoReturn:
    raise CpuTimeExceeded


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 20] + "... (cut)"


class Runner:
    """The runner's side of the protocol: one bound job, tasks in sequence."""

    def __init__(self, channel: socket.socket, limits: dict[str, int]) -> None:
        self.channel = channel
        self.limits = limits
        """sandbox.* settings the failure messages name: cpu_seconds, memory_mb, file_mb."""
        self.pid = os.getpid()
        self.stages = PYTHON_JOB
        self.mapper: ModuleType | None = None
        self.reducer: ModuleType | None = None
        self.partitions = 0

    def serve(self) -> None:
        ops: dict[str, Callable[[dict[str, Any], list[int]], Reply]] = {
            "load": self.load, "map": self.map, "reduce": self.reduce, "task": self.task}
        fdmsg.send(self.channel, {"ready": True, "pid": self.pid})
        while (got := fdmsg.recv(self.channel, None)) is not None:
            request, fds = got
            op = str(request.get("op"))
            fatal = False
            out: list[int] = []
            try:
                reply, out = ops[op](request, fds)
                reply["ok"] = True
            except BaseException as exc:  # user code may raise anything, even SystemExit
                reply, fatal = self._failure(op, exc)
            finally:
                fdmsg.close_all(fds)
            self._only_the_runner()
            if fatal:  # the process hit a limit: it may be in no state to serve another task
                reply["fatal"] = True
            fdmsg.send(self.channel, reply, out)
            fdmsg.close_all(out)
            if fatal:
                os._exit(1)

    def _only_the_runner(self) -> None:
        """A process that user code forked and that came back into the runner's code must
        not speak on the channel: only the runner itself answers."""
        if os.getpid() != self.pid:
            os._exit(0)

    def _failure(self, op: str, exc: BaseException) -> tuple[dict[str, Any], bool]:
        """The reply for a failed request, and whether the runner must exit after it."""
        limits = self.limits
        what = "loading the job's code" if op == "load" else f"the {op} task"
        tb = clip(traceback.format_exc(), MAX_TRACEBACK)
        error: str
        fatal = False
        if isinstance(exc, CpuTimeExceeded):
            error = f"{what} exceeded the CPU-time limit of {limits['cpu_seconds']} s (sandbox.cpu_seconds)"
            fatal = True
        elif isinstance(exc, MemoryError):
            error = f"{what} exceeded the memory limit of {limits['memory_mb']} MB (sandbox.memory_mb)"
            fatal = True
        elif isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            error = f"{what} tried to write a file larger than {limits['file_mb']} MB (sandbox.file_mb)"
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            error = f"{what} filled its disk quota of {limits['disk_mb']} MB (sandbox.disk_mb)"
        elif isinstance(exc, IPDCError):  # IPDC's own error (the data): no user traceback
            return {"ok": False, "error": clip(str(exc), MAX_ERROR), "traceback": ""}, False
        else:
            error = f"{type(exc).__name__}: {exc}"
        return {"ok": False, "error": clip(error, MAX_ERROR), "traceback": tb}, fatal

    def load(self, request: dict[str, Any], fds: list[int]) -> Reply:
        names = [str(n) for n in request["files"]]
        if len(names) != len(fds):
            raise JobError(f"the agent sent {len(fds)} files for {len(names)} names")
        for name, fd in zip(names, fds, strict=True):
            Path(name).write_bytes(_read(fd))
        sys.path.insert(0, os.getcwd())
        self.partitions = int(request["partitions"])
        tag = str(request["job"])
        stages = self.stages = stages_of(request.get("stages"), set(names))
        for stage in (stages.map, stages.combine, stages.reduce):
            if isinstance(stage, CommandStage) and stage.shipped:
                os.chmod(stage.argv[0], 0o755)
        if isinstance(stages.map, PythonStage) and stages.map.file in names:
            self.mapper = load_module(Path(stages.map.file).absolute(), f"ipdc_job_{tag}_map")
        if isinstance(stages.reduce, PythonStage) and stages.reduce.file in names:
            self.reducer = load_module(Path(stages.reduce.file).absolute(), f"ipdc_job_{tag}_reduce")
        return {}, []

    def map(self, request: dict[str, Any], fds: list[int]) -> Reply:
        t0 = time.perf_counter()
        data = _read(fds[0])
        mapper = self.stages.map
        if isinstance(mapper, CommandStage):
            from ipdc.runner.streaming import map_command  # imported here: see the note at the top

            documents = map_command(mapper, self.stages.combine, data, self.partitions, self.output_cap,
                                    str(request.get("path", "")))
        elif self.mapper is None:
            raise JobError("this job has no Map.py")
        else:
            text = str(data, "utf-8", "surrogateescape")
            documents = write_partitions(map_pairs(self.mapper, text, str(request.get("path", ""))),
                                         self.partitions)
        self._only_the_runner()
        t1 = time.perf_counter()
        return _output(documents, {"map": t1 - t0})

    def reduce(self, request: dict[str, Any], fds: list[int]) -> Reply:
        t0 = time.perf_counter()
        data = _read(fds[0])
        documents, start = [], 0
        for size in request["sizes"]:
            documents.append(data[start:start + int(size)])
            start += int(size)
        reducer = self.stages.reduce
        try:
            if isinstance(reducer, CommandStage):  # the part: the blocks the reducer wrote
                from ipdc.runner.streaming import reduce_command  # imported here: see the note at the top

                blocks = reduce_command(reducer, documents, self.output_cap)
            elif self.reducer is None:
                raise JobError("this job has no Reduce.py")
            else:
                blocks = [reduce_partitions(self.reducer, documents)]
        except PartitionError as exc:
            raise JobError(f"a map output of this reduce task is malformed: {exc}") from None
        self._only_the_runner()
        t1 = time.perf_counter()
        output = fdmsg.sealed_memfd(blocks, "ipdc-output")
        return {"sizes": [sum(map(len, blocks))], "stats": {"reduce": t1 - t0}}, [output]

    @property
    def output_cap(self) -> int:
        """The most a streaming program's stdout is read: the agent takes no larger output."""
        return self.limits["file_mb"] << 20


    def task(self, request: dict[str, Any], fds: list[int]) -> Reply:
        """A Python API task (:mod:`ipdc.runner.pytask`): the memfd holds the function, then
        each argument, back to back; ``sizes`` and ``codecs`` describe them."""
        data = memoryview(_read(fds[0]))
        parts, start = [], 0
        for size in request["sizes"]:
            parts.append(data[start:start + int(size)])
            start += int(size)
        t0 = time.perf_counter()
        args = list(zip(request["codecs"], parts[1:], strict=True))
        from ipdc.runner import pytask  # imported here: see the note at the top

        ok, codec, value, trace = pytask.run(bytes(parts[0]), args, [str(k) for k in request["kwargs"]],
                                             bool(request["chunk"]))
        self._only_the_runner()
        reply, out = _output([value], {"run": time.perf_counter() - t0})
        reply.update(raised=not ok, codec=codec, traceback=clip(trace, MAX_TRACEBACK))
        return reply, out


def _read(fd: int) -> bytes | mmap.mmap:
    """The bytes of a memfd from the agent, mapped rather than copied."""
    size = os.fstat(fd).st_size
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else b""


def _output(documents: list[bytes], stats: dict[str, float]) -> Reply:
    """The reply for a task's outputs: their sizes, and one sealed memfd holding them."""
    output = fdmsg.sealed_memfd(documents, "ipdc-output")
    return {"sizes": [len(d) for d in documents], "stats": stats}, [output]


def main() -> None:
    """The runner's main(), run by the sandbox's boot code; ``sys.argv[1]``: the limits."""
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises EFBIG instead
    Runner(socket.socket(fileno=CHANNEL_FD), json.loads(sys.argv[1])).serve()
