"""How the agent runs one task of a job: in a sandboxed runner, never in itself.

The agent's shell decides *that* a task runs (see :mod:`ipdc.agent.jobs`); this
module does it. A runner has no network, so the agent does all of a task's I/O:

1. it fetches each input from its kubo and checks the bytes against their CID; a map
   task's chunk goes straight into the runner's memfd as it arrives
   (:meth:`ipdc.kubo.KuboClient.fetch_checked_into`), so it is never whole in the agent;
2. hands them to the job's runner as one sealed memfd;
3. takes the outputs back as one sealed memfd (an unsealed one, or one over
   ``sandbox.file_mb``, is refused), with their sizes in the reply;
4. adds them to kubo in one request, and reports their CIDs.

Small inputs and outputs skip kubo on the critical path: an input that came inline in
its message is taken from :class:`~ipdc.agent.inline.Received`, and a small output is
reported inline and added to kubo afterwards (:class:`~ipdc.agent.inline.Produced`).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ipdc.agent.inline import Produced, Received
from ipdc.agent.sandbox import Runner, RunnerPool
from ipdc.config import SandboxSection
from ipdc.errors import SandboxError, TaskFailed
from ipdc.kubo import KuboClient
from ipdc.spawn import Sandbox
from ipdc.wire import fdmsg
from ipdc.wire.ids import Cid
from ipdc.wire.inline import Inline, threshold
from ipdc.wire.manifest import ChunkSource, JobManifest

log = logging.getLogger(__name__)

#: Map outputs a reduce task fetches at once: each one from another peer is a bitswap round trip.
FETCH_THREADS = 8

Result = tuple[list[Cid], dict[str, float], Inline]
"""The outputs' CIDs, the task's stats, and the small outputs' bytes to report inline."""


class Executor:
    """Runs map and reduce tasks of the jobs this agent holds, each in the job's own runners."""

    def __init__(self, settings: SandboxSection, sandbox: Sandbox, kubo: KuboClient, warm: int) -> None:
        self.settings = settings
        self.kubo = kubo
        self.pool = RunnerPool(settings, sandbox, warm)
        self.fetchers = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="input")
        self.received = Received()
        self.produced = Produced(kubo)

    def prepare(self, job: str, manifest: JobManifest, job_dir: Path) -> None:
        """Bind a runner to the job now, while its first task is on its way."""
        self.pool.release(self._acquire(job, manifest, job_dir))

    def run_map(self, job: str, manifest: JobManifest, job_dir: Path, chunk: Cid,
                source: ChunkSource | None = None) -> Result:
        """``source``: where the chunk comes from (see :class:`~ipdc.wire.manifest.ChunkSource`);
        its path goes to the runner for a ``map(line, path)``."""
        t0 = time.perf_counter()
        memfd = fdmsg.memfd("ipdc-input")
        try:
            # the chunk goes from kubo straight into the runner's memfd: a 25 MB chunk is never
            # whole in the agent's memory (it was twice, for a moment, as one bytes object)
            if source is not None and source.length is not None:
                if source.length > self.cap:
                    raise TaskFailed(f"the map task's chunk is {source.length >> 20} MB, more than "
                                     f"sandbox.file_mb = {self.settings.file_mb} MB: give the job more --chunks")
                self.kubo.fetch_range_into(chunk, source.offset, source.length, memfd,
                                           stall=self.settings.fetch_stall)
            elif (data := self.received.get(job, chunk)) is not None:
                fdmsg.write_all(memfd, data)
            else:
                self.kubo.fetch_checked_into(chunk, memfd, stall=self.settings.fetch_stall, cap=self.cap)
            fdmsg.seal(memfd)
            size = os.fstat(memfd).st_size
        except BaseException:
            os.close(memfd)
            raise
        request = {"op": "map", "path": source.path if source is not None else ""}
        return self._run(job, manifest, job_dir, request, memfd, manifest.partitions,
                         {"fetch": time.perf_counter() - t0, "bytes": float(size)})

    def run_reduce(self, job: str, manifest: JobManifest, job_dir: Path, inputs: tuple[Cid, ...]) -> Result:
        t0 = time.perf_counter()
        documents = list(self.fetchers.map(lambda cid: self.fetch(job, cid), inputs))
        return self._run(job, manifest, job_dir, {"op": "reduce", "sizes": [len(d) for d in documents]},
                         fdmsg.sealed_memfd(documents, "ipdc-input"), 1, {"fetch": time.perf_counter() - t0})

    def _acquire(self, job: str, manifest: JobManifest, job_dir: Path) -> Runner:
        """The job's runner, bound with its code and what runs each of its stages."""
        return self.pool.acquire(job, _code(manifest, job_dir), manifest.partitions, manifest.params.get("stages"))

    def fetch(self, job: str, cid: str) -> bytes:
        """One input: as it came inline for the job, or from wherever the swarm holds it; checked
        against its CID either way."""
        data = self.received.get(job, cid)
        return self.fetch_swarm(cid) if data is None else data

    @property
    def cap(self) -> int:
        """Bytes of one task input the agent reads at most (sandbox.file_mb): it holds each in
        memory, and a few blocks can name a file of any size."""
        return self.settings.file_mb << 20

    def fetch_swarm(self, cid: str) -> bytes:
        """One input from wherever the swarm holds it, checked against its CID, at most :attr:`cap` bytes."""
        return self.kubo.fetch_checked(cid, stall=self.settings.fetch_stall, cap=self.cap)

    def _run(self, job: str, manifest: JobManifest, job_dir: Path, request: dict[str, Any],
             memfd: int, outputs: int, stats: dict[str, float]) -> Result:
        """Run one task on the sealed input ``memfd``, which this closes."""
        try:
            runner = self._acquire(job, manifest, job_dir)
        except BaseException:
            os.close(memfd)
            raise
        try:
            reply, fds = runner.call(request, [memfd], timeout=self.settings.task_timeout)
            try:
                documents = self.outputs(reply, fds, outputs)
            except TaskFailed:
                runner.kill()  # it broke the protocol: never hand it out again
                raise
        finally:
            fdmsg.close_all([memfd])
            self.pool.release(runner)
        t0 = time.perf_counter()
        cids, inline = self.produced.store(job, documents, threshold(manifest.params))
        task_stats = reply.get("stats")
        if isinstance(task_stats, dict):
            stats.update({str(k): float(v) for k, v in task_stats.items() if isinstance(v, (int, float))})
        stats["store"] = time.perf_counter() - t0
        return cids, stats, inline

    def outputs(self, reply: dict[str, Any], fds: list[int], count: int) -> list[bytes]:
        """The ``count`` documents the runner handed back; TaskFailed when they do not add up."""
        sizes = reply.get("sizes")
        try:
            if len(fds) != 1:
                raise SandboxError(f"{len(fds)} output fds, not 1")
            data = fdmsg.read_sealed(fds.pop(), self.cap)
        except SandboxError as exc:
            raise TaskFailed(f"the runner's output was refused: {exc} (sandbox.file_mb = "
                             f"{self.settings.file_mb} MB)") from None
        finally:
            fdmsg.close_all(fds)
        if (not isinstance(sizes, list) or len(sizes) != count
                or not all(type(s) is int and s >= 0 for s in sizes) or sum(sizes) != len(data)):
            raise TaskFailed(f"the runner's output was refused: {count} sizes adding up to {len(data)} bytes "
                             "were expected")
        documents, start = [], 0
        for size in sizes:
            documents.append(data[start:start + size])
            start += size
        return documents

    def drop(self, job: str) -> None:
        """Stop the job's runners and forget its inline inputs; return once its outputs are in
        kubo, so that they can be unpinned."""
        self.pool.drop(job)
        self.received.drop(job)
        self.produced.settle(job)

    def close(self) -> None:
        self.pool.close()
        self.produced.close()
        self.fetchers.shutdown(wait=False, cancel_futures=True)


def _code(manifest: JobManifest, job_dir: Path) -> dict[str, bytes]:
    """The job's code files, as the agent fetched (and checked) them into its work dir."""
    return {name: (job_dir / name).read_bytes() for name in manifest.code}

