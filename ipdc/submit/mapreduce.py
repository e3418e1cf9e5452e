"""The MapReduce controller: runs on the submitting node (any node can submit).

A job, step by step:

1. a fresh job id (uuid4); the K live peers nearest ``sha256(job_id)`` by XOR
   distance become the workers, and partition ``p`` is reduced by worker ``p``;
2. Map.py, Reduce.py and the input go into the submitter's kubo; the input as
   line-aligned chunks, more chunks than workers when that balances load;
3. Download (the signed manifest) to every worker; each fetches the code by CID
   and answers ``ready``;
4. DoMap tasks, at most ``slots`` in flight per worker, the next one sent as each
   finishes; a mapper reports its K partition CIDs on GetResult;
5. the submitter takes one result per (task, attempt) and passes each partition
   CID on Buffer to its reducer; a reducer that holds one Buffer per map task
   reduces and reports its part's CID, which the submitter fetches at once;
6. it writes ``part-NNNNN``, ``job.json`` and ``_SUCCESS``, and sends CleanUp.

Workers are lost: they crash, sleep or drop off the network. A worker whose
presence is cleared (its last will) or whose heartbeats stop for
``agent.peer_timeout`` is dropped from the job, and the next XOR-nearest live peer
joins in its place. Its running map tasks run again elsewhere; so do its finished
ones while a reducer may still need their output, since that lived in its kubo.
Its reduce partitions start a new attempt on the replacement, which is sent every
accepted map output by CID. Results of superseded attempts, and anything a lost
worker says when it comes back, are ignored. A task that fails (or loses its
worker) ``--max-attempts`` times fails the job, as Dask's KilledWorker does.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipdc.errors import IPDCError, JobError, NotEnoughPeers, TaskFailed
from ipdc.jobs import shipped
from ipdc.kubo import KuboClient, single_block
from ipdc.peers import Peer, select_nearest
from ipdc.submit.client import SwarmClient
from ipdc.wire.buffer import BUFFER, Buffer
from ipdc.wire.cleanup import CLEANUP, CleanUp
from ipdc.wire.domap import DOMAP, DoMap
from ipdc.wire.download import DOWNLOAD, Download
from ipdc.wire.getresult import GetResult
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest

log = logging.getLogger(__name__)

JOBS_DIR = shipped("mapreduce")
MiB = 1 << 20
MAX_CHUNK = 64 * MiB
#: A worker is dropped only once it has been gone this long with our own connection up:
#: a broker that shuts down publishes every client's last will, and then drops us too.
WILL_GRACE = 0.5

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
    max_attempts: int = 3
    """Attempts per task (failures plus lost workers) before the job fails."""


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
    reassigned: list[dict[str, Any]] = field(default_factory=list)
    """Tasks moved off lost workers: kind, task, from, to (the replacement, if any), attempt."""
    lost: list[str] = field(default_factory=list)
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
    """Four tasks per worker, chunks of 1 to 64 MiB.

    Several tasks per worker let a fast worker take more and shorten the tail in which one
    worker still computes while the others wait; more, and reduce has more pieces to merge
    (M x K partitions) for little gain. Measured
    on 202 MB with K=2 (map + reduce wall): 4 chunks 10.1-11.3 s, 8 chunks 8.6 s,
    16 chunks 9.6-9.9 s.
    """
    return max(1, min(math.ceil(size / MiB), 4 * k), math.ceil(size / MAX_CHUNK))


def check_job_files(job: MapReduceJob) -> None:
    """Fail before touching the swarm on what the user can fix at once.

    The files are compiled, not run: user code never executes in the submitter.
    """
    if not job.input.is_file():
        raise JobError(f"input file {job.input} does not exist (or is not a file)")
    if not os.access(job.input, os.R_OK):
        raise JobError(f"input file {job.input} is not readable")
    for path, needed in ((job.map_file, ("map", "map_chunk")), (job.reduce_file, ("reduce",))):
        try:
            source = path.read_text()
        except OSError as exc:
            raise JobError(f"cannot read job file {path}: {exc.strerror}") from None
        try:
            compile(source, str(path), "exec")
        except SyntaxError as exc:
            raise JobError(f"job file {path} has a syntax error, line {exc.lineno}: {exc.msg}") from None
        if not any(f"def {name}(" in source for name in needed):
            raise JobError(f"job file {path} defines no `{needed[0]}` function")
    if job.k is not None and job.k < 1:
        raise JobError(f"--k must be at least 1, not {job.k}")
    if job.max_attempts < 1:
        raise JobError(f"--max-attempts must be at least 1, not {job.max_attempts}")
    if job.output is not None and job.output.exists() and any(job.output.iterdir()):
        raise JobError(f"output directory {job.output} exists and is not empty; "
                       "choose another --output or remove it")


@dataclass
class Task:
    """One map or reduce task, as the controller tracks it across attempts."""

    kind: str
    """"map" or "reduce"."""
    index: int
    attempt: int = -1
    """The attempt whose result counts; -1 before the first dispatch."""
    peer: str = ""
    """Where the current attempt runs (a reducer: where its partition is assigned)."""
    failures: int = 0
    tried: list[str] = field(default_factory=list)
    """Peers on which an attempt failed or was lost, in order."""
    cids: list[Cid] | None = None
    """The accepted output."""
    done_by: str = ""
    reserved_for: str = ""
    """Map only: the replacement of the lost worker that ran it; no other worker takes it."""
    sent: dict[int, str] = field(default_factory=dict)
    """Reduce only: map task -> mapper, for the Buffers sent under the current attempt."""
    fetched: bool = False
    """Reduce only: the part is in the staging directory."""

    @property
    def label(self) -> str:
        return f"{self.kind} task {self.index}"


class MapReduceController:
    """Runs one MapReduce job from the submitting node.

    One thread drives the job as an event loop over the workers' reports, the
    peer table and the part fetches, so every decision (accept a result, retry a
    task, replace a worker) is taken in one place and in order.
    """

    def __init__(self, client: SwarmClient, kubo: KuboClient, job: MapReduceJob,
                 progress: ProgressFn | None = None) -> None:
        self.client = client
        self.kubo = kubo
        self.job = job
        self.progress = progress or (lambda phase, done, total: None)
        self.job_id = JobId.new()
        self.timings: dict[str, float] = {}
        self.workers: dict[str, Peer] = {}
        """Peers taking part now, nearest the job key first (some may still be downloading)."""
        self.ready: set[str] = set()
        self.lost: set[str] = set()
        self.inflight: dict[str, int] = {}
        self.maps: list[Task] = []
        self.reduces: list[Task] = []
        self.pending: deque[int] = deque()
        self.reassigned: list[dict[str, Any]] = []
        self.fetches: dict[int, tuple[str, Future[None]]] = {}
        self.manifest: JobManifest | None = None
        self.staging = Path()
        self.wake: "queue.Queue[GetResult | None]" = queue.Queue()
        """The job's reports, plus a None from each finished part fetch, so the loop never
        sleeps on news that has come."""

    def run(self) -> JobResult:
        check_job_files(self.job)
        started = time.monotonic()
        for peer in self.choose_workers():
            self.workers[peer.name] = peer
        output = self.job.output or Path("ipdc-out") / self.job_id
        self.staging = output.with_name(f".{output.name}.partial")
        fetcher = ThreadPoolExecutor(2, thread_name_prefix="fetch")
        try:
            self.wake = self.client.watch(self.job_id)  # type: ignore[assignment]
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            t = time.monotonic()
            ranges = self.upload()
            self.timings["upload"] = time.monotonic() - t
            self.execute(fetcher)
            result = self.describe(output, ranges)
            self.timings["total"] = time.monotonic() - started
            result.timings = self.timings
            self.finish(result)
            return result
        finally:
            fetcher.shutdown(wait=False, cancel_futures=True)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.client.unwatch(self.job_id)
            try:  # before CleanUp: once the workers unpin too, every kubo on the machine is busy
                if self.manifest is not None:
                    self.kubo.pin_rm(*self.manifest.chunks, *self.manifest.code.values())
            except IPDCError as exc:  # the job's own outcome matters more than its litter
                log.warning("job %s: could not unpin its input and code: %s", self.job_id, exc)
            finally:
                for name in [*self.workers, *self.lost]:
                    self.client.send(CLEANUP, name, CleanUp(self.job_id))

    # -- planning --------------------------------------------------------------------
    def choose_workers(self) -> list[Peer]:
        live = self.client.peers.live()
        k = self.job.k if self.job.k is not None else len(live)
        workers = select_nearest(live, self.job_id, k)
        if not live:
            raise NotEnoughPeers("no peer of the swarm is live: check that this node and its agent run "
                                 "(`python deploy.py status`) and that others have joined (`ipdc peers`)")
        if len(workers) < k:
            raise NotEnoughPeers(
                f"the job asks for {k} workers (--k {k}) but {len(live)} peer(s) are live; "
                "start more nodes (`python deploy.py init --join TOKEN && python deploy.py start`) "
                "or lower --k"
            )
        log.info("job %s: workers %s", self.job_id, ", ".join(p.name for p in workers))
        return workers

    def upload(self) -> list[tuple[int, int]]:
        size = self.job.input.stat().st_size
        ranges = plan_chunks(self.job.input, self.job.chunks or default_chunks(size, len(self.workers)))
        self.progress("upload", 0, size)
        with open(self.job.map_file, "rb") as m, open(self.job.reduce_file, "rb") as r:
            code_cids = self.kubo.add_streams([("Map.py", m), ("Reduce.py", r)])
        chunk_cids = self.kubo.add_ranges(self.job.input, ranges)
        self.progress("upload", size, size)
        self.manifest = JobManifest(
            job_id=self.job_id, owner=NodeName(self.client.name),
            code={"Map.py": code_cids[0], "Reduce.py": code_cids[1]},
            chunks=chunk_cids, reducers=[NodeName(n) for n in self.workers],
            submitter=self.client.submitter,
        )
        return ranges

    # -- the event loop --------------------------------------------------------------
    def execute(self, fetcher: ThreadPoolExecutor) -> None:
        """Run every task to an accepted, fetched result, whatever peers are lost meanwhile."""
        assert self.manifest is not None
        t = time.monotonic()
        self.maps = [Task("map", i) for i in range(len(self.manifest.chunks))]
        self.reduces = [Task("reduce", p, attempt=0, peer=name) for p, name in enumerate(self.workers)]
        self.pending.extend(range(len(self.maps)))
        for name in self.workers:
            self.client.send(DOWNLOAD, name, Download(self.manifest))
        self.progress("map", 0, len(self.maps))
        self.progress("reduce", 0, len(self.reduces))
        connections = self.client.connections
        next_check = reconnected_at = 0.0
        missing: dict[str, float] = {}
        """Worker -> when we first found it not live."""
        while not all(r.fetched for r in self.reduces):
            try:
                result = self.wake.get(timeout=0.1)
            except queue.Empty:
                result = None
            if result is not None:
                self.handle(result, fetcher)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.2
                if self.client.connections != connections:
                    connections, reconnected_at = self.client.connections, now
                    missing.clear()
                    self.resend()
                for name in list(self.workers):
                    if self.client.peers.is_live(name):
                        missing.pop(name, None)
                    elif now - missing.setdefault(name, now) >= WILL_GRACE and self.client.bus.connected \
                            and now - reconnected_at > self.client.config.agent.peer_timeout:
                        self.drop_worker(name, "it stopped answering (its last will, or no heartbeat "
                                               f"for {self.client.config.agent.peer_timeout:g} s)")
            self.check_fetches()
            if "download" not in self.timings and len(self.ready) == len(self.workers):
                self.timings["download"] = time.monotonic() - t
            if "map" not in self.timings and all(m.cids is not None for m in self.maps):
                self.timings["map"] = time.monotonic() - t
            if "reduce" not in self.timings and all(r.cids is not None for r in self.reduces):
                self.timings["reduce"] = time.monotonic() - t - self.timings.get("map", 0.0)
        self.timings["fetch"] = time.monotonic() - t - sum(self.timings.get(k, 0.0) for k in ("map", "reduce"))

    def handle(self, result: GetResult, fetcher: ThreadPoolExecutor) -> None:
        peer = result.peer
        if peer not in self.workers:
            log.info("ignored late %s result for task %d attempt %d from %s",
                     result.kind, result.task, result.attempt, peer)
            return
        if result.kind == "ready":
            if peer not in self.ready:
                self.ready.add(peer)
                self.send_buffers()
                self.dispatch()
            return
        if result.kind == "error" and result.phase == "download":
            self.drop_worker(peer, result.error)
            return
        if result.kind not in ("map", "reduce", "error"):
            return
        tasks = self.reduces if result.kind == "reduce" or result.phase == "reduce" else self.maps
        if not 0 <= result.task < len(tasks):
            log.warning("ignored a report for unknown task %d from %s", result.task, peer)
            return
        task = tasks[result.task]
        if result.attempt != task.attempt or peer != task.peer:
            log.info("ignored late %s result for task %d attempt %d from %s",
                     result.kind, result.task, result.attempt, peer)
        elif task.cids is not None:
            log.debug("ignored a duplicate %s result for task %d from %s", result.kind, result.task, peer)
        elif result.kind == "error":
            self.fail(task, peer, result.error)
        elif task.kind == "map":
            self.accept_map(task, result.cids)
        elif len(result.cids) != 1:
            self.fail(task, peer, f"{task.label} reported {len(result.cids)} parts, not 1")
        else:
            task.cids, task.done_by = list(result.cids), peer
            part = self.staging / f"part-{task.index:05d}"
            future = fetcher.submit(self.kubo.cat_to, result.cids[0], part)
            future.add_done_callback(lambda _: self.wake.put(None))
            self.fetches[task.index] = (peer, future)
            self.progress("reduce", sum(r.cids is not None for r in self.reduces), len(self.reduces))

    def accept_map(self, task: Task, cids: list[Cid]) -> None:
        if len(cids) != len(self.reduces):
            self.fail(task, task.peer, f"{task.label} returned {len(cids)} partitions, not {len(self.reduces)}")
            return
        task.cids, task.done_by = list(cids), task.peer
        self.inflight[task.peer] -= 1
        self.progress("map", sum(m.cids is not None for m in self.maps), len(self.maps))
        self.send_buffers()
        self.dispatch()

    def check_fetches(self) -> None:
        for index, (peer, future) in list(self.fetches.items()):
            if not future.done():
                continue
            del self.fetches[index]
            task = self.reduces[index]
            try:
                future.result()
            except (IPDCError, OSError) as exc:
                task.cids = None
                self.fail(task, peer, f"could not fetch part {index} from {peer}: {exc}")
                continue
            task.fetched = True

    # -- dispatch ----------------------------------------------------------------------
    def dispatch(self) -> None:
        """Fill free slots of ready workers with pending map tasks, nearest worker first."""
        for name, peer in self.workers.items():
            while name in self.ready and self.inflight.get(name, 0) < max(1, peer.presence.slots):
                mine = [i for i in self.pending if self.maps[i].reserved_for in ("", name)]
                # a task goes back to a peer that failed it only when every worker has
                fresh = [i for i in mine if name not in self.maps[i].tried
                         or set(self.workers) <= set(self.maps[i].tried)]
                if not fresh:
                    break
                index = fresh[0]
                self.pending.remove(index)
                task = self.maps[index]
                task.attempt += 1
                task.peer = name
                self.inflight[name] = self.inflight.get(name, 0) + 1
                self.client.send(DOMAP, name, DoMap(self.job_id, index, task.attempt))

    def send_buffers(self) -> None:
        """Give each ready reducer every accepted map output it lacks under its current attempt."""
        for reduce in self.reduces:
            if reduce.cids is not None or reduce.peer not in self.ready:
                continue
            for task in self.maps:
                if task.cids is not None and task.index not in reduce.sent:
                    reduce.sent[task.index] = task.done_by
                    self.send_buffer(reduce, task)

    def send_buffer(self, reduce: Task, task: Task) -> None:
        """One accepted map output's share, to the partition's reducer, under its current attempt."""
        assert task.cids is not None
        self.client.send(BUFFER, reduce.peer, Buffer(
            self.job_id, reduce.index, task.index, task.cids[reduce.index], reduce.attempt))

    def resend(self) -> None:
        """After our own reconnect: send again what the outage may have swallowed.

        Every agent handler is idempotent, so a message that did arrive is harmless twice.
        """
        assert self.manifest is not None
        log.info("job %s: reconnected to the broker; sending outstanding requests again", self.job_id)
        for name in self.workers:
            if name not in self.ready:
                self.client.send(DOWNLOAD, name, Download(self.manifest.reissued()))
        for task in self.maps:
            if task.cids is None and task.peer in self.ready and task.index not in self.pending:
                self.client.send(DOMAP, task.peer, DoMap(self.job_id, task.index, task.attempt))
        for reduce in self.reduces:
            if reduce.cids is None and reduce.peer in self.ready:
                for index in reduce.sent:
                    self.send_buffer(reduce, self.maps[index])

    # -- failures --------------------------------------------------------------------
    def count_failure(self, task: Task, peer: str, error: str) -> None:
        """Note a failed or lost attempt; after --max-attempts of them the job fails."""
        task.failures += 1
        task.tried.append(peer)
        if task.failures >= self.job.max_attempts:
            raise TaskFailed(
                f"job {self.job_id} failed: {task.label} failed {task.failures} time(s), on "
                f"{', '.join(task.tried)} (--max-attempts {self.job.max_attempts}); "
                f"the last error, from {peer}:\n{error}",
                peer=peer, remote_traceback=error)

    def fail(self, task: Task, peer: str, error: str) -> None:
        """An attempt failed: retry it elsewhere, or fail the job after --max-attempts."""
        self.count_failure(task, peer, error)
        log.warning("job %s: %s attempt %d failed on %s; retrying (%d of %d)", self.job_id, task.label,
                    task.attempt, peer, task.failures + 1, self.job.max_attempts)
        if task.kind == "map":
            if peer in self.inflight:
                self.inflight[peer] -= 1
            task.peer = task.reserved_for = ""
            self.pending.appendleft(task.index)
            self.dispatch()
        else:
            self.move_reduce(task, self.reducer_for(task))

    def drop_worker(self, name: str, reason: str) -> None:
        """Take a lost worker out of the job; its tasks go to the next XOR-nearest live peer."""
        log.warning("job %s: worker %s lost: %s", self.job_id, name, reason.splitlines()[0] if reason else "")
        self.workers.pop(name)
        self.ready.discard(name)
        self.inflight.pop(name, None)
        self.lost.add(name)
        replacement = self.recruit()
        for task in self.maps:
            if task.reserved_for == name:  # the replacement itself was lost: pass the task on
                task.reserved_for = replacement.name if replacement else ""
        if not self.workers:
            raise JobError(f"job {self.job_id} failed: every worker was lost (the last, {name}: {reason}); "
                           "check the nodes with `ipdc peers` and submit again")
        needed = not all(r.fetched for r in self.reduces)
        for task in self.maps:
            if task.peer == name and task.cids is None and task.index not in self.pending:
                self.count_failure(task, name, f"its worker {name} was lost while running it ({reason}); "
                                               "like Dask's KilledWorker, the task may be what kills workers")
                self.reassign(task, name, replacement)
                task.peer = ""
                self.pending.appendleft(task.index)
            elif task.done_by == name and needed:
                # its output lives in the lost node's kubo, which may be gone too: compute it again
                self.reassign(task, name, replacement)
                task.cids, task.done_by, task.peer = None, "", ""
                self.pending.append(task.index)
        for reduce in self.reduces:
            if reduce.cids is not None:
                continue
            if reduce.peer == name:
                target = replacement.name if replacement else self.reducer_for(reduce)
                if len(reduce.sent) == len(self.maps):  # it was reducing when it was lost
                    self.count_failure(reduce, name, f"its worker {name} was lost while reducing ({reason})")
                self.reassign(reduce, name, replacement)
                self.move_reduce(reduce, target)
            elif name in reduce.sent.values():
                self.move_reduce(reduce, reduce.peer)  # it holds output of the lost mapper
        self.send_buffers()
        self.dispatch()

    def reassign(self, task: Task, lost: str, replacement: Peer | None) -> None:
        if task.kind == "map":
            task.reserved_for = replacement.name if replacement else ""
        self.reassigned.append({"kind": task.kind, "task": task.index, "from": lost,
                                "to": replacement.name if replacement else "", "attempt": task.attempt + 1})

    def recruit(self) -> Peer | None:
        """The next XOR-nearest live peer not yet in the job, asked to join it."""
        assert self.manifest is not None
        taken = set(self.workers) | self.lost
        spare = select_nearest(self.client.peers.live(), self.job_id, 1, lambda p: p.name not in taken)
        if not spare:
            log.warning("job %s: no spare peer; the remaining workers take over", self.job_id)
            return None
        peer = spare[0]
        log.info("job %s: %s joins as a replacement worker", self.job_id, peer.name)
        self.workers[peer.name] = peer
        self.client.send(DOWNLOAD, peer.name, Download(self.manifest.reissued()))
        return peer

    def reducer_for(self, task: Task) -> str:
        """A worker for a reduce retry: the nearest to the partition's key that has not failed it."""
        candidates = [p for p in self.workers.values() if p.name not in task.tried] or list(self.workers.values())
        return select_nearest(candidates, f"{self.job_id}/{task.index}", 1)[0].name

    def move_reduce(self, task: Task, peer: str) -> None:
        """Start the partition's next attempt on ``peer``, sending it every accepted map output."""
        task.attempt += 1
        task.peer = peer
        task.sent = {}
        self.send_buffers()

    # -- results ---------------------------------------------------------------------
    def describe(self, output: Path, ranges: list[tuple[int, int]]) -> JobResult:
        assert self.manifest is not None
        names = {f"part-{r.index:05d}": r.cids[0] for r in self.reduces if r.cids}
        sizes = {name: (self.staging / name).stat().st_size if single_block(cid) else self.kubo.cumulative_size(cid)
                 for name, cid in names.items()}
        result_cid = self.kubo.make_directory(names, sizes)
        return JobResult(
            job_id=self.job_id, output=output.absolute(), result_cid=result_cid,
            workers=[{"name": p.name, "peer_id": p.peer_id} for p in self.workers.values()],
            code=dict(self.manifest.code), chunks=list(self.manifest.chunks),
            parts=list(names.values()), map_tasks={m.index: m.done_by for m in self.maps},
            input=str(self.job.input.absolute()), input_bytes=sum(n for _, n in ranges),
            submitted_at=self.manifest.submitted_at, reassigned=self.reassigned,
            lost=sorted(self.lost),
        )

    def finish(self, result: JobResult) -> None:
        """Write job.json and _SUCCESS, then move the whole directory into place at once."""
        (self.staging / "job.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (self.staging / "_SUCCESS").touch()
        if result.output.exists():
            result.output.rmdir()  # checked empty before the job started
        result.output.parent.mkdir(parents=True, exist_ok=True)
        self.staging.rename(result.output)
