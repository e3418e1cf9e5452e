"""Hadoop Streaming stages: a mapper, combiner or reducer that is a program, not Python.

The runner starts the program with an argv list (never a shell) as its own child, so
it is in the same sandbox, under the same limits, as the runner itself. Its stdin is
fed from a thread while its stdout is read as it comes, so neither side waits on a
full pipe; its stderr is drained by a third thread that keeps only its end, for the
error of a failed task (and copies it to the runner's log).

The semantics are Hadoop Streaming's:

* a **mapper** reads the chunk's raw bytes (not UTF-8 ones pass untouched) and writes
  lines, each split at its first TAB into key and value; a line without a TAB is a key
  with an empty value. Keys and values are strings (the bytes decoded as UTF-8 with
  ``surrogateescape``, so any bytes round-trip), partitioned as a Python job's keys are;
* a **combiner** reads the map task's output sorted by key and writes lines the same way;
* a **reducer** reads its partition's ``key<TAB>value`` lines sorted by key, bytewise
  (one key's lines are together, its values in no set order), and whatever it writes
  is the part file, as it wrote it.

Lines end at ``\\n`` only (a ``\\r`` before it is part of the value). What a program
writes is read only up to ``sandbox.file_mb``: more fails the task.
"""

from __future__ import annotations

import io
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import suppress
from typing import Any, cast

from ipdc.errors import JobError
from ipdc.runner.mapreduce import format_field, merge_partitions
from ipdc.wire.partition import KeyGroups, write_partitions
from ipdc.wire.stages import CommandStage

#: Bytes read from a program's stdout at a time, and the size of the blocks of a chunk written to its stdin.
BLOCK = 1 << 20
#: Lines of sorted map output written to a combiner's or reducer's stdin at a time.
BLOCK_LINES = 1 << 16
#: How much of the end of a failed program's stderr its task error carries.
STDERR_TAIL = 2000
#: What a signal that ended a program says about it: the limit and the setting behind it.
SIGNALS = {signal.SIGXCPU: "the CPU-time limit, sandbox.cpu_seconds",
           signal.SIGXFSZ: "the file-size limit, sandbox.file_mb",
           signal.SIGKILL: "the memory limit, sandbox.memory_mb, or a kill from outside the sandbox"}


def records(blocks: Iterable[bytes]) -> Iterator[tuple[str, str]]:
    """The ``(key, value)`` records of a program's output, given as blocks of bytes cut
    anywhere: each line split at its first TAB (no TAB: an empty value), the bytes
    decoded with ``surrogateescape``. Blocks are decoded whole lines at a time, not line
    by line. The blocks of a line that has not ended yet are held apart and joined once, at
    its end: joining them block by block made a 400 MB line take a minute (quadratic)."""
    rest: list[bytes] = []
    for block in blocks:
        end = block.rfind(b"\n")
        if end < 0:
            rest.append(block)
            continue
        data = b"".join([*rest, block[:end]]) if rest else block[:end]
        rest = [block[end + 1:]]
        for line in data.decode("utf-8", "surrogateescape").split("\n"):
            key, _, value = line.partition("\t")
            yield key, value
    if last := b"".join(rest):
        key, _, value = last.decode("utf-8", "surrogateescape").partition("\t")
        yield key, value


def take_sorted_lines(groups: KeyGroups) -> Iterator[bytes]:
    """``key<TAB>value\\n`` lines of every value of ``groups``, sorted by the key's bytes,
    in blocks of about :data:`BLOCK_LINES` lines. A key or value that is not a string (from
    a Python mapper) is written as JSON, as in a Python job's output.

    It empties ``groups`` and lets go of each key's values once they are written, so the
    groups and the lines made of them are not both held whole. Lines are joined as text
    and encoded a block at a time: a third of the time of encoding each value alone."""
    keys = [format_field(key) for key in groups.keys()]  # noqa: SIM118 - a method, not a dict's
    keyed = sorted(zip([key.encode("utf-8", "surrogateescape") for key in keys], keys, groups.by_key.values(),
                       strict=True), key=_first, reverse=True)
    groups.by_key.clear()
    groups.wrapped = False
    lines: list[str] = []
    while keyed:
        _, key, values = keyed.pop()
        prefix = key + "\t"
        lines += [prefix + (v if type(v) is str else format_field(v)) + "\n" for v in values]
        if len(lines) >= BLOCK_LINES:
            yield "".join(lines).encode("utf-8", "surrogateescape")
            lines = []
    if lines:
        yield "".join(lines).encode("utf-8", "surrogateescape")


def _first(item: tuple[bytes, str, list[Any]]) -> bytes:
    return item[0]


def group(pairs: Iterable[tuple[str, str]]) -> KeyGroups:
    """Records grouped by key, as a Python mapper's pairs are."""
    groups = KeyGroups()
    groups.add_pairs(pairs)
    return groups


class Program:
    """One run of a stage's program: stdin fed from a thread, stdout read by the caller,
    stderr's end kept. Use as a context manager; :meth:`output` yields stdout, then
    checks the exit status."""

    def __init__(self, role: str, stage: CommandStage, feed: Iterable[bytes | memoryview], cap: int,
                 env: dict[str, str] | None = None) -> None:
        """``env``: variables added to the runner's environment for the program."""
        self.role = role
        self.stage = stage
        self.cap = cap
        """Bytes of stdout read at most: ``sandbox.file_mb``."""
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.feed_error: BaseException | None = None
        self.exited, self._exited_w = os.pipe()
        """Readable (at its end of file) once the program has exited and its group is killed."""
        program = self.resolve()
        try:
            self.process = subprocess.Popen(
                [program, *stage.argv[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                env={**os.environ, **env} if env else None)
        except OSError as exc:
            os.close(self.exited)
            os.close(self._exited_w)
            hint = " (a script needs a #! line)" if exc.errno == 8 else ""
            raise JobError(f"the {role} `{stage.line}` could not start: {exc.strerror}{hint}") from None
        self.threads = [threading.Thread(target=self._feed, args=(feed,), daemon=True),
                        threading.Thread(target=self._drain, daemon=True),
                        threading.Thread(target=self._end_group, daemon=True)]
        for thread in self.threads:
            thread.start()

    def resolve(self) -> str:
        """The program's path inside the sandbox; a clear error when there is none."""
        stage = self.stage
        name = stage.argv[0]
        if stage.shipped:
            return os.path.abspath(name)
        found = shutil.which(name)
        if found is None:
            path = os.environ.get("PATH", os.defpath)
            raise JobError(f"the {self.role} program {name!r} was not found on this worker (PATH={path} "
                           f"inside its sandbox): ship it with the job (--file {name}) or install it there")
        return found

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        """Never leave the program behind: on an error, it is killed, with its process group."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        for thread in self.threads:
            thread.join()
        os.close(self.exited)

    def _end_group(self) -> None:
        """Once the program has exited, kill what it left running in its process group (its
        session, as Hadoop kills a task's process tree), and mark it exited: the pipes are
        then read only to their current end (:meth:`_blocks`), so a leftover that holds them
        open (one that left the group with ``setsid``) cannot keep the task waiting, nor add
        to its output. Waited for without reaping, so the group's id cannot be reused
        meanwhile; the task's thread reaps it."""
        try:
            os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ChildProcessError, ProcessLookupError):
            pass  # reaped already (its output had ended), or no process was left in the group
        finally:
            os.close(self._exited_w)

    def _blocks(self, fd: int) -> Iterator[bytes]:
        """What the program writes on pipe ``fd``, block by block, to its end of file or, once
        the program has exited, to the end of what is in the pipe: all the program wrote
        is there by then, and whatever still holds the pipe open is a leftover."""
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        poll.register(self.exited, select.POLLIN)
        while True:
            ready = {f for f, _ in poll.poll()}
            if fd not in ready:
                return  # exited, and the pipe is empty
            block = os.read(fd, BLOCK)
            if not block:
                return
            yield block

    def _feed(self, feed: Iterable[bytes | memoryview]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            for block in feed:
                stdin.write(block)
        except BrokenPipeError:
            pass  # the program stopped reading: its exit status tells whether that was fine
        except BaseException as exc:
            self.feed_error = exc
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass

    def _drain(self) -> None:
        stderr = cast(io.BufferedReader, self.process.stderr)
        log = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        for block in self._blocks(stderr.fileno()):
            if log is not None:
                log.write(block)
            self.tail.append(block)
            self.tail_size += len(block)
            while self.tail_size - len(self.tail[0]) >= STDERR_TAIL:
                self.tail_size -= len(self.tail.popleft())
        stderr.close()

    def output(self) -> Iterator[bytes]:
        """stdout, block by block; at its end, JobError unless the program exited with 0."""
        stdout = cast(io.BufferedReader, self.process.stdout)
        read = 0
        for block in self._blocks(stdout.fileno()):
            read += len(block)
            if read > self.cap:
                raise JobError(f"the {self.role} `{self.stage.line}` wrote more than {self.cap >> 20} MB "
                               "(sandbox.file_mb)")
            yield block
        status = self.process.wait()
        for thread in self.threads:
            thread.join()
        if self.feed_error is not None:
            raise self.feed_error
        if status != 0:
            raise JobError(f"the {self.role} `{self.stage.line}` {_ended(status)}{self._stderr()}")

    def _stderr(self) -> str:
        text = b"".join(self.tail)[-STDERR_TAIL:].decode("utf-8", "replace").rstrip()
        return f"; the end of its stderr:\n{text}" if text else " (it wrote nothing on stderr)"


def _ended(status: int) -> str:
    if status > 0:
        return f"exited with status {status}"
    try:
        sig = signal.Signals(-status)
    except ValueError:
        return f"was killed by signal {-status}"
    why = SIGNALS.get(sig)
    return f"was killed by {sig.name}" + (f" ({why})" if why else "")


def _slices(data: bytes | mmap.mmap) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), BLOCK):
        yield view[start:start + BLOCK]


def run_stage(role: str, stage: CommandStage, feed: Iterable[bytes | memoryview], cap: int,
              env: dict[str, str] | None = None) -> KeyGroups:
    """Run ``stage`` on ``feed``; its output's records, grouped by key."""
    with Program(role, stage, feed, cap, env) as program:
        return group(records(program.output()))


def map_command(mapper: CommandStage, combiner: CommandStage | None, chunk: bytes | mmap.mmap,
                partitions: int, cap: int, path: str = "") -> list[bytes]:
    """One map task of a streaming mapper: its partition documents. ``path``: the input file
    the chunk is part of, given to the mapper and combiner in the environment as Hadoop
    Streaming does (``mapreduce_map_input_file``, and the older ``map_input_file``)."""
    env = {"mapreduce_map_input_file": path, "map_input_file": path} if path else None
    groups = run_stage("mapper", mapper, _slices(chunk), cap, env)
    if combiner is not None:
        groups = run_stage("combiner", combiner, take_sorted_lines(groups), cap, env)
    return write_partitions(groups, partitions)


def reduce_command(reducer: CommandStage, documents: Iterable[bytes], cap: int) -> list[bytes]:
    """One reduce task of a streaming reducer: the part, as the blocks the reducer wrote."""
    groups = merge_partitions(documents)
    with Program("reducer", reducer, take_sorted_lines(groups), cap) as program:
        return list(program.output())
