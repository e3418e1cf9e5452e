"""The MapReduce controller: runs on the submitting node (any node can submit).

A job, step by step:

1. a fresh job id (uuid4); the K live peers nearest ``sha256(job_id)`` by XOR
   distance become the workers, and partition ``p`` is reduced by worker ``p``;
2. Map.py, Reduce.py and the input go into the submitter's kubo; the input as
   line-aligned chunks, more chunks than workers when that balances load;
3. Download (the manifest) to every worker; each fetches the code by CID and
   answers ``ready``;
4. DoMap tasks, at most ``slots`` in flight per worker, the next one sent as each
   finishes; each mapper sends its K partition CIDs on Buffer to the reducers;
5. each reducer, once it holds one Buffer per map task, reduces and reports its
   part's CID on GetResult;
6. the submitter fetches the K parts, writes ``part-NNNNN``, ``job.json`` and
   ``_SUCCESS``, and sends CleanUp.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from channels.cleanup import CLEANUP, CleanUp
from channels.domap import DOMAP, DoMap
from channels.download import DOWNLOAD, Download
from channels.getresult import GetResult
from ipdc.client import SwarmClient
from ipdc.errors import JobError, NotEnoughPeers, TaskFailed
from ipdc.ids import Cid, JobId, NodeName
from ipdc.job import JobManifest
from ipdc.kubo import KuboClient
from ipdc.peers import Peer, select_nearest

log = logging.getLogger(__name__)

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs" / "mapreduce"
MiB = 1 << 20
MAX_CHUNK = 64 * MiB

#: ``progress(phase, done, total)``: phases are "upload" (bytes), "map" and "reduce" (tasks).
ProgressFn = Callable[[str, float, float], None]


@dataclass(frozen=True)
class MapReduceJob:
    """What the user asks for: their Map.py and Reduce.py over one input file."""

    input: Path
    k: int | None = None
    """Workers (and reducers). None: every live peer."""
    map_file: Path = JOBS_DIR / "Map.py"
    reduce_file: Path = JOBS_DIR / "Reduce.py"
    output: Path | None = None
    """Default: ``./ipdc-out/<job-id>``."""
    chunks: int | None = None
    """Map tasks. None: chosen from the input size and K."""


@dataclass
class JobResult:
    job_id: str
    output: Path
    result_cid: str
    workers: list[dict[str, str]]
    code: dict[str, str]
    chunks: list[str]
    parts: list[str]
    map_tasks: dict[int, str]
    input: str
    input_bytes: int
    submitted_at: float
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        return data


def plan_chunks(path: Path, chunks: int) -> list[tuple[int, int]]:
    """Split ``path`` into ``chunks`` (offset, length) ranges that end on a newline.

    A line longer than a chunk makes fewer, larger chunks; there is always at least
    one range, so an empty input still runs one (empty) map task.
    """
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        for i in range(1, chunks):
            target = max(size * i // chunks, bounds[-1])
            if target >= size:
                break
            f.seek(target)
            f.readline()  # run to the end of the line we landed in
            end = f.tell()
            if bounds[-1] < end < size:
                bounds.append(end)
    bounds.append(size)
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])] or [(0, 0)]


def default_chunks(size: int, k: int) -> int:
    """Two tasks per worker (so a fast worker takes more), chunks of 1 to 64 MiB."""
    return max(1, min(math.ceil(size / MiB), 2 * k), math.ceil(size / MAX_CHUNK))


def check_job_files(job: MapReduceJob) -> None:
    """Fail before touching the swarm on what the user can fix at once.

    The files are compiled, not run: user code never executes in the submitter.
    """
    if not job.input.is_file():
        raise JobError(f"input file {job.input} does not exist (or is not a file)")
    if not os.access(job.input, os.R_OK):
        raise JobError(f"input file {job.input} is not readable")
    for path, needed in ((job.map_file, "map"), (job.reduce_file, "reduce")):
        try:
            source = path.read_text()
        except OSError as exc:
            raise JobError(f"cannot read job file {path}: {exc.strerror}") from None
        try:
            compile(source, str(path), "exec")
        except SyntaxError as exc:
            raise JobError(f"job file {path} has a syntax error, line {exc.lineno}: {exc.msg}") from None
        if f"def {needed}(" not in source and f"def {needed}_chunk(" not in source:
            raise JobError(f"job file {path} defines no `{needed}` function")
    if job.k is not None and job.k < 1:
        raise JobError(f"--k must be at least 1, not {job.k}")
    if job.output is not None and job.output.exists() and any(job.output.iterdir()):
        raise JobError(f"output directory {job.output} exists and is not empty; "
                       "choose another --output or remove it")


class MapReduceController:
    """Runs one MapReduce job from the submitting node."""

    def __init__(self, client: SwarmClient, kubo: KuboClient, job: MapReduceJob,
                 progress: ProgressFn | None = None) -> None:
        self.client = client
        self.kubo = kubo
        self.job = job
        self.progress = progress or (lambda phase, done, total: None)
        self.job_id = JobId.new()
        self.timings: dict[str, float] = {}

    def run(self) -> JobResult:
        check_job_files(self.job)
        started = time.monotonic()
        workers = self.choose_workers()
        results = self.client.watch(self.job_id)
        manifest: JobManifest | None = None
        try:
            t = time.monotonic()
            manifest, ranges = self.upload(workers)
            self.timings["upload"] = time.monotonic() - t
            t = time.monotonic()
            self.download(manifest, workers, results)
            self.timings["download"] = time.monotonic() - t
            map_tasks, parts = self.execute(manifest, workers, results)
            t = time.monotonic()
            result, staging = self.collect(manifest, workers, map_tasks, parts, ranges)
            self.timings["fetch"] = time.monotonic() - t
            self.timings["total"] = time.monotonic() - started
            result.timings = self.timings
            self.finish(result, staging)
            return result
        finally:
            self.client.unwatch(self.job_id)
            for peer in workers:
                self.client.send(CLEANUP, peer.name, CleanUp(self.job_id))
            if manifest is not None:
                for cid in [*manifest.chunks, *manifest.code.values()]:
                    self.kubo.pin_rm(cid)

    # -- steps -----------------------------------------------------------------------
    def choose_workers(self) -> list[Peer]:
        live = self.client.peers.live()
        k = self.job.k if self.job.k is not None else len(live)
        workers = select_nearest(live, self.job_id, k)
        if not live or len(workers) < k:
            raise NotEnoughPeers(
                f"the job asks for {k} workers (--k {k}) but {len(live)} peer(s) are live; "
                "start more nodes (`python deploy.py init --join TOKEN && python deploy.py start`) "
                "or lower --k"
            )
        log.info("job %s: workers %s", self.job_id, ", ".join(p.name for p in workers))
        return workers

    def upload(self, workers: list[Peer]) -> tuple[JobManifest, list[tuple[int, int]]]:
        size = self.job.input.stat().st_size
        ranges = plan_chunks(self.job.input, self.job.chunks or default_chunks(size, len(workers)))
        self.progress("upload", 0, size)
        with open(self.job.map_file, "rb") as m, open(self.job.reduce_file, "rb") as r:
            code_cids = self.kubo.add_streams([("Map.py", m), ("Reduce.py", r)])
        chunk_cids = self.kubo.add_ranges(self.job.input, ranges)
        self.progress("upload", size, size)
        manifest = JobManifest(
            job_id=self.job_id, owner=NodeName(self.client.name),
            code={"Map.py": code_cids[0], "Reduce.py": code_cids[1]},
            chunks=chunk_cids, reducers=[NodeName(p.name) for p in workers],
        )
        return manifest, ranges

    def download(self, manifest: JobManifest, workers: list[Peer],
                 results: "queue.Queue[GetResult]") -> None:
        for peer in workers:
            self.client.send(DOWNLOAD, peer.name, Download(manifest))
        waiting = {p.name for p in workers}
        while waiting:
            result = self._next(results, workers, "download the job's code")
            if result.kind == "ready":
                waiting.discard(result.peer)

    def execute(self, manifest: JobManifest, workers: list[Peer], results: "queue.Queue[GetResult]"
                ) -> tuple[dict[int, str], dict[int, Cid]]:
        """Dispatch map tasks as slots free up; wait for every part."""
        t = time.monotonic()
        pending = deque(range(len(manifest.chunks)))
        done: dict[int, str] = {}
        parts: dict[int, Cid] = {}
        self.progress("map", 0, len(pending))
        self.progress("reduce", 0, len(workers))

        def dispatch(peer_name: str) -> None:
            if pending:
                self.client.send(DOMAP, peer_name, DoMap(self.job_id, pending.popleft()))

        for peer in workers:
            for _ in range(max(1, peer.presence.slots)):
                dispatch(peer.name)
        while len(parts) < len(workers):
            result = self._next(results, workers, "finish its tasks")
            if result.kind == "map" and result.task not in done:
                done[result.task] = result.peer
                self.progress("map", len(done), len(manifest.chunks))
                if len(done) == len(manifest.chunks):
                    self.timings["map"] = time.monotonic() - t
                dispatch(result.peer)
            elif result.kind == "reduce" and result.task not in parts:
                parts[result.task] = result.cids[0]
                self.progress("reduce", len(parts), len(workers))
        self.timings["reduce"] = time.monotonic() - t - self.timings.get("map", 0.0)
        return done, parts

    def _next(self, results: "queue.Queue[GetResult]", workers: list[Peer], what: str) -> GetResult:
        """The next report; raise on a task error or on a worker that left the swarm."""
        while True:
            try:
                result = results.get(timeout=0.5)
            except queue.Empty:
                live = {p.name for p in self.client.peers.live()}
                gone = [p.name for p in workers if p.name not in live]
                if gone:
                    raise JobError(f"worker(s) {', '.join(gone)} left the swarm while the job waited "
                                   f"for them to {what}; job {self.job_id} failed")
                continue
            if result.kind == "error":
                raise TaskFailed(f"job {self.job_id} failed on {result.peer}:\n{result.error}",
                                 peer=result.peer, remote_traceback=result.error)
            return result

    def collect(self, manifest: JobManifest, workers: list[Peer], map_tasks: dict[int, str],
                parts: dict[int, Cid], ranges: list[tuple[int, int]]) -> tuple[JobResult, Path]:
        """Fetch the parts into a staging directory next to the output."""
        output = self.job.output or Path("ipdc-out") / self.job_id
        staging = output.with_name(f".{output.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        names = {f"part-{p:05d}": parts[p] for p in range(len(workers))}
        for name, cid in names.items():
            self.kubo.cat_to(cid, staging / name)
        result_cid = self.kubo.make_directory(names)
        self.kubo.pin_add(result_cid)
        result = JobResult(
            job_id=self.job_id, output=output.absolute(), result_cid=result_cid,
            workers=[{"name": p.name, "peer_id": p.peer_id} for p in workers],
            code=dict(manifest.code), chunks=list(manifest.chunks),
            parts=[parts[p] for p in range(len(workers))], map_tasks=map_tasks,
            input=str(self.job.input.absolute()), input_bytes=sum(n for _, n in ranges),
            submitted_at=manifest.submitted_at,
        )
        return result, staging

    def finish(self, result: JobResult, staging: Path) -> None:
        """Write job.json and _SUCCESS, then move the whole directory into place at once."""
        (staging / "job.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (staging / "_SUCCESS").touch()
        if result.output.exists():
            result.output.rmdir()  # checked empty before the job started
        result.output.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(result.output)
