"""The MapReduce controller's shell: runs one job from the submitting node.

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

Every decision (accept a result, retry a task, replace a lost worker, verify
replicas) is taken by the pure state machine in :mod:`ipdc.submit.mrstate`. This
module only does the I/O around it: it uploads, turns the workers' reports and a
clock into events, and turns the commands into signed messages and part fetches.
It also checks that every report answers a request it really sent to that peer
(``GetResult.re``), so no other member can steer the job with forged replies.
"""

from __future__ import annotations

import io
import json
import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from ipdc.errors import IPDCError, JobCancelled, JobError, NotEnoughPeers
from ipdc.home import SubmittedJobs
from ipdc.jobs import shipped
from ipdc.kubo import KuboClient, single_block
from ipdc.peers import Peer, select_nearest
from ipdc.submit.client import SwarmClient
from ipdc.submit.inline import Payloads
from ipdc.submit.inputs import Input, Split, check_local, cid_input, input_text, local_input, plan_splits
from ipdc.submit.jobfiles import JobCode, plan_code
from ipdc.submit.mrstate import (
    Attempt,
    Command,
    Event,
    Failed,
    JobState,
    MapDone,
    PartFetched,
    Ready,
    ReduceDone,
    SendBuffer,
    SendDoMap,
    SendDownload,
    SendRenew,
    Settings,
    Task,
    TaskState,
    Tick,
)
from ipdc.wire.buffer import BUFFER, Buffer
from ipdc.wire.channel import Channel
from ipdc.wire.cleanup import CLEANUP, CleanUp
from ipdc.wire.domap import DOMAP, DoMap
from ipdc.wire.download import DOWNLOAD, Download
from ipdc.wire.getresult import GetResult
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.inline import InlineMismatch
from ipdc.wire.manifest import MAX_TASKS, ChunkSource, JobManifest
from ipdc.wire.renew import RENEW, Renew
from ipdc.wire.unixfs import cid_of

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
    """What the user asks for: their Map.py and Reduce.py, or commands (Hadoop Streaming),
    over one input."""

    input: Path | str
    """A local file or directory, or an input in IPFS: a CID or ``/ipfs/CID/path`` (a str);
    see :mod:`ipdc.submit.inputs`."""
    k: int | None = None
    """Workers (and reducers). None: every live peer."""
    map_file: Path = JOBS_DIR / "Map.py"
    """The Python map stage, unless ``mapper`` is given."""
    reduce_file: Path = JOBS_DIR / "Reduce.py"
    """The Python reduce stage, unless ``reducer`` is given."""
    mapper: str | None = None
    """A command line (split with shlex, never a shell) that maps instead of ``map_file``."""
    reducer: str | None = None
    """A command line that reduces instead of ``reduce_file``."""
    combiner: str | None = None
    """A command line that combines each map task's sorted output (with ``mapper`` only)."""
    files: tuple[Path, ...] = ()
    """Files shipped with the job into its working directory: programs, helpers, data."""
    output: Path | None = None
    """Default: ``./ipdc-out/<job-id>``."""
    chunks: int | None = None
    """Map tasks. None: chosen from the input size and K."""
    max_attempts: int = 3
    """Attempts per task (failures plus lost workers) before the job fails."""
    cache: bool = True
    """Take the result of an identical job from the swarm's cache (see :mod:`ipdc.control.cache`)."""
    verify: int = 1
    """Distinct peers that run every task; an output counts only when they agree."""
    verify_majority: bool = False
    """With verify > 1: take the output most replicas agree on instead of failing."""


@dataclass
class Resume:
    """What a controller needs to take up a job it ran before it was stopped (see
    :meth:`ipdc.submit.mrstate.JobState.restore`): its manifest, its workers, and its tasks
    as recorded."""

    manifest: JobManifest
    workers: list[tuple[str, int]]
    """(name, slots) of the job's workers when it stopped, nearest the job first."""
    maps: list[Task]
    reduces: list[Task]
    lost: dict[str, str]
    reassigned: list[dict[str, Any]]
    elapsed: float
    """Seconds since the job started, downtime included."""
    input_bytes: int


class Observer(Protocol):
    """Who follows a controller from outside: the controller service records each job."""

    def planned(self, controller: MapReduceController) -> None:
        """The input and code are uploaded and the manifest is made: what a resume needs."""

    def progressed(self, controller: MapReduceController) -> None:
        """Called after each round of the event loop (about ten times a second)."""


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
    input_cid: str = ""
    """The whole input's CID (see :mod:`ipdc.submit.inputs`)."""
    cache_key: str = ""
    cached: bool = False
    """The result came from the swarm's cache: no task ran."""
    cached_from: str = ""
    """With ``cached``: the job that computed the result."""
    reassigned: list[dict[str, Any]] = field(default_factory=list)
    """Tasks moved off lost workers: kind, task, from, to (the replacement, if any), attempt."""
    lost: list[str] = field(default_factory=list)
    verify: int = 1
    tasks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Every task's final state, attempts and story (see ``task_record``)."""
    timings: dict[str, float] = field(default_factory=dict)
    transport: dict[str, int] = field(default_factory=dict)
    """How many code files, chunks, map outputs and parts moved inline (``<what>_inline``) and
    through IPFS (``<what>_ipfs``); see :mod:`ipdc.wire.inline`."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        return data


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

    The files are parsed, not run: user code never executes in the submitter.
    """
    if isinstance(job.input, Path):
        check_local(job.input)
    job_code(job)
    if job.k is not None and job.k < 1:
        raise JobError(f"--k must be at least 1, not {job.k}")
    if job.chunks is not None and not 1 <= job.chunks <= MAX_TASKS:
        raise JobError(f"--chunks must be 1 to {MAX_TASKS} (a job's most map tasks), not {job.chunks}; "
                       "leave it out to choose from the input's size")
    if job.max_attempts < 1:
        raise JobError(f"--max-attempts must be at least 1, not {job.max_attempts}")
    if job.verify < 1:
        raise JobError(f"--verify must be at least 1, not {job.verify}")
    if job.k is not None and job.verify > job.k:
        raise JobError(f"--verify {job.verify} runs every task on {job.verify} distinct peers, so it "
                       f"needs --k of at least {job.verify}")
    if job.output is not None and job.output.exists() and not job.output.is_dir():
        raise JobError(f"output {job.output} is a file, and --output names the directory to write the "
                       "parts into: choose another --output")
    if job.output is not None and job.output.exists() and any(job.output.iterdir()):
        raise JobError(f"output directory {job.output} exists and is not empty; "
                       "choose another --output or remove it")


def read_split(split: Split) -> bytes:
    """A local input's chunk, read from its file."""
    assert split.file.local is not None
    with open(split.file.local, "rb") as f:
        f.seek(split.offset)
        return f.read(split.length)


def job_code(job: MapReduceJob) -> JobCode:
    """The job's stages and the files it ships, checked (the check runs again at upload: the
    controller service may run the job long after it was submitted)."""
    return plan_code(job.map_file, job.reduce_file, job.mapper, job.reducer, job.combiner, job.files)


class MapReduceController:
    """Runs one MapReduce job from the submitting node: an event loop around a JobState."""

    def __init__(self, client: SwarmClient, kubo: KuboClient, job: MapReduceJob, home: Path,
                 progress: ProgressFn | None = None, *, job_id: JobId | None = None,
                 observer: Observer | None = None, resume: Resume | None = None) -> None:
        """``home``: the submitting node's home, where the job's uploads are recorded until
        they are unpinned (its agent unpins them if this process dies first). ``resume``:
        take up the job ``job_id`` from what an earlier controller recorded."""
        self.client = client
        self.uploads = SubmittedJobs(home)
        self.kubo = kubo
        self.job = job
        self.progress = progress or (lambda phase, done, total: None)
        self.job_id = job_id or JobId.new()
        self.observer = observer
        self.resume = resume
        self.cancelled = threading.Event()
        """Set from another thread to cancel the job: the loop raises JobCancelled, and the
        usual way out unpins the job's uploads and sends CleanUp to every peer."""
        self.input_bytes = 0
        self.timings: dict[str, float] = {}
        self.payloads = Payloads(client.config.agent.inline_max)
        self.release_later = False
        """Set by a caller that calls :meth:`release` itself once it has recorded a success (the
        controller service: its user need not wait for the unpin and CleanUp). A job that fails
        is always released by :meth:`run`."""
        self.adding: threading.Thread | None = None
        """The background add of a job whose uploads all travel inline (see :meth:`upload`)."""
        self.splits: list[Split] = []
        """The map tasks' chunks, when this controller planned them (not after a resume)."""
        self.code_files: dict[str, Path] = {}
        self.workers: list[tuple[str, int]] = []
        """(name, slots) of the workers the job starts with, nearest the job first."""
        self.cache_key = ""
        """The job's key in the swarm's result cache, when its runner looked it up: job.json has it."""
        """The input chunks' (offset, length), to read a small chunk into its DoMap. A resumed
        job has none: its chunks and code go by CID."""
        self.peers: dict[str, Peer] = {}
        """Every peer that took part, by name."""
        self.sent: dict[str, set[str]] = {}
        """Peer -> digests of the requests we sent it: a report must answer one of them."""
        self.fetches: dict[int, Future[int]] = {}
        self.manifest: JobManifest | None = None
        self.source: Input | None = None
        self.state: JobState | None = None
        self.staging = Path()
        self.wake: queue.Queue[GetResult | None] = queue.Queue()
        """The job's reports, plus a None from each finished part fetch, so the loop never
        sleeps on news that has come."""

    def run(self) -> JobResult:
        started = time.monotonic()
        succeeded = False
        if self.resume is None:
            check_job_files(self.job)
            peers = self.choose_workers()
            self.peers = {p.name: p for p in peers}
            workers = [(p.name, p.presence.slots) for p in peers]
        else:
            self.peers = {p.name: p for p in self.client.peers.live()}
            workers = self.resume.workers
        if not workers:  # a resume of a job that recorded none: nobody would ever answer it
            raise JobError(f"job {self.job_id} has no workers to take it up; submit it again")
        self.workers = workers
        output = self.job.output or Path("ipdc-out") / self.job_id
        self.staging = output.with_name(f".{output.name}.partial")
        fetcher = ThreadPoolExecutor(2, thread_name_prefix="fetch")
        try:
            self.wake = self.client.watch(self.job_id)  # type: ignore[assignment]
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            t = time.monotonic()
            if self.resume is None:
                self.upload(len(workers))
            else:
                self.reclaim(self.resume)
            self.timings["upload"] = time.monotonic() - t
            if self.observer is not None:
                self.observer.planned(self)
            self.execute(workers, fetcher)
            result = self.describe(output)
            self.timings["total"] = time.monotonic() - started
            result.timings = self.timings
            result.transport = dict(sorted(self.payloads.counts.items()))
            self.finish(result)
            succeeded = True
            return result
        finally:
            fetcher.shutdown(wait=False, cancel_futures=True)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.client.unwatch(self.job_id)
            if not (succeeded and self.release_later):
                self.release()

    def release(self) -> None:
        """Unpin the job's uploads and send CleanUp to every peer that took part."""
        if self.adding is not None:
            self.adding.join()  # its pins, then ours off
        try:  # before CleanUp: once the workers unpin too, every kubo on the machine is busy
            if self.manifest is not None:
                self.kubo.pin_rm(*self.manifest.uploaded())
            self.uploads.forget(self.job_id)
        except IPDCError as exc:  # the job's own outcome matters more than its litter
            log.warning("job %s: could not unpin its input and code: %s", self.job_id, exc)
        finally:
            for name in self.peers:
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
                "start more nodes (`python deploy.py init --join-file FILE && python deploy.py start`) "
                "or lower --k"
            )
        log.info("job %s: workers %s", self.job_id, ", ".join(p.name for p in workers))
        return workers

    def input_source(self) -> Input:
        """The job's input, listed (and its CID computed) once."""
        if self.source is None:
            given = self.job.input
            self.source = local_input(given) if isinstance(given, Path) else cid_input(self.kubo, given)
        return self.source

    def upload(self, workers: int) -> None:
        """Put the code and a local input's chunks in this node's kubo, and make the manifest;
        an input given by CID is only cut into byte ranges of its files.

        When every upload is small enough to travel inline (see :mod:`ipdc.wire.inline`), no
        worker waits for kubo: their CIDs are computed here and the adds run in the
        background, finished before the job's end unpins them."""
        source = self.input_source()
        size = self.input_bytes = source.size
        splits = self.splits = plan_splits(source, self.job.chunks or default_chunks(size, workers), self.kubo,
                                           self.client.config.sandbox.fetch_stall)
        self.progress("upload", 0, size)
        code = job_code(self.job)
        self.code_files = code.files
        local = [s for s in splits if s.file.local is not None]
        limit = self.payloads.limit
        if all(path.stat().st_size <= limit for path in code.files.values()) and all(s.length <= limit
                                                                                    for s in local):
            code_bytes = {name: path.read_bytes() for name, path in code.files.items()}
            code_cids = [Cid(cid_of(data)) for data in code_bytes.values()]
            added = [Cid(cid_of(read_split(s))) for s in local]
            self.uploads.record(self.job_id, [*code_cids, *added])  # first: a kill leaves a record
            self.adding = threading.Thread(target=self.add_uploads, args=(code_bytes, local, [*code_cids, *added]),
                                           name="upload", daemon=True)
            self.adding.start()
        else:
            code_cids = self.add_code(code.files)
            self.uploads.record(self.job_id, list(code_cids))  # first: a kill from now on leaves a record
            added = self.add_chunks(local)
            self.uploads.record(self.job_id, [*code_cids, *added])
        self.progress("upload", size, size)
        fresh = iter(added)
        self.manifest = JobManifest(
            job_id=self.job_id, owner=NodeName(self.client.name),
            code=dict(zip(code.files, code_cids, strict=True)),
            chunks=[next(fresh) if s.file.cid is None else s.file.cid for s in splits],
            partitions=workers, workers=[NodeName(p) for p in self.peers], submitter=self.client.submitter,
            params={"stages": code.stages.to_params(), "inline_max": limit},
            sources=[ChunkSource(s.file.path, s.offset, None if s.file.cid is None else s.length)
                     for s in splits],
        )

    def add_uploads(self, code: dict[str, bytes], local: list[Split], expected: list[Cid]) -> None:
        """The background half of :meth:`upload`: the same adds, checked against the CIDs the
        manifest already names."""
        try:
            added = [*self.kubo.add_streams([(name, io.BytesIO(data)) for name, data in code.items()]),
                     *self.add_chunks(local)]
        except IPDCError as exc:
            log.warning("job %s: could not add its code and input to kubo: %s", self.job_id, exc)
            return
        if added != expected:
            log.error("job %s: kubo names the job's uploads %s, not %s: its import settings differ from "
                      "IPDC's (Import.CidVersion, chunker, raw leaves)", self.job_id, added, expected)

    def add_code(self, files: dict[str, Path]) -> list[Cid]:
        """Add the job's code files to kubo, each from its path, in one request."""
        with ExitStack() as opened:
            return self.kubo.add_streams([(name, opened.enter_context(open(path, "rb")))
                                          for name, path in files.items()])

    def add_chunks(self, local: list[Split]) -> list[Cid]:
        """Add a local input's chunks to kubo, each from its file, in one request."""
        return self.kubo.add_ranges((s.file.local, s.offset, s.length) for s in local if s.file.local is not None)

    def reclaim(self, resume: Resume) -> None:
        """Hold on to a resumed job's uploads again: while no submitter lived, the node's
        agent may have unpinned them (the blocks stay until a GC, so pinning is cheap)."""
        self.manifest = resume.manifest
        self.input_bytes = resume.input_bytes
        self.payloads.limit = min(self.payloads.limit, resume.manifest.params.get("inline_max", 0))
        cids = [str(c) for c in resume.manifest.uploaded()]
        self.uploads.record(self.job_id, cids)
        if any(not self.kubo.has(c) for c in cids):
            self.add_again(resume.manifest)
        self.kubo.pin_add(*cids)

    def add_again(self, manifest: JobManifest) -> None:
        """Add a resumed job's code and local chunks again, from its files: a service killed
        while an inline job's adds ran in the background left blocks that no node holds, and
        a pin of them would wait on the swarm for ever. The files must still be what the
        signed manifest names, or the job cannot go on."""
        code = job_code(self.job).files
        added = dict(zip(code, self.add_code(code), strict=True))
        chunks = manifest.chunks  # an input given by CID was never added here
        if isinstance(self.job.input, Path):
            splits = plan_splits(self.input_source(), self.job.chunks or default_chunks(self.input_bytes,
                                                                                       manifest.partitions))
            chunks = self.add_chunks(splits) if len(splits) == len(manifest.chunks) else []
        if added != manifest.code or chunks != manifest.chunks:
            raise JobError(f"job {self.job_id} cannot be resumed: its code or input changed since it was "
                           "submitted, and this node's kubo no longer holds what it sent; submit it again")
        log.info("job %s: added its code and input again (its first adds never finished)", self.job_id)

    # -- the event loop --------------------------------------------------------------
    def execute(self, workers: list[tuple[str, int]], fetcher: ThreadPoolExecutor) -> None:
        """Run every task to an accepted, fetched result, whatever peers are lost meanwhile.

        ``workers``: (name, slots), nearest the job first."""
        assert self.manifest is not None
        cfg = self.client.config
        live = self.client.peers.live()
        settings = Settings(
            partitions=self.manifest.partitions, max_attempts=self.job.max_attempts,
            verify=self.job.verify, majority=self.job.verify_majority, will_grace=WILL_GRACE,
            peer_timeout=cfg.agent.peer_timeout, ready_timeout=cfg.agent.ready_timeout,
            renew_every=max(0.5, min((p.presence.lease for p in live), default=120.0) / 4),
        )
        t = time.monotonic()
        state = self.state = JobState(workers, len(self.manifest.chunks), settings, t)
        restored: list[Command] = []
        if self.resume is not None:
            r = self.resume
            restored = state.restore(r.maps, r.reduces, r.lost, r.reassigned, r.elapsed)
        self.perform(state.start() + restored, fetcher)
        self.progress("map", 0, len(state.maps))
        self.progress("reduce", 0, len(state.reduces))
        next_tick = 0.0
        while not state.done:
            if self.cancelled.is_set():
                raise JobCancelled(f"job {self.job_id} was cancelled")
            try:
                result = self.wake.get(timeout=0.1)
            except queue.Empty:
                result = None
            if result is not None and (event := self.event_of(result)) is not None:
                self.perform(state.handle(event), fetcher)
            for partition, future in list(self.fetches.items()):
                if future.done():
                    del self.fetches[partition]
                    error = "" if future.exception() is None else str(future.exception())
                    self.perform(state.handle(PartFetched(partition, error)), fetcher)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 0.2
                self.perform(state.handle(self.tick(now)), fetcher)
            self.progress("map", state.maps_done, len(state.maps))
            self.progress("reduce", state.reduces_done, len(state.reduces))
            self.note_times(state, t)
            if self.observer is not None:
                self.observer.progressed(self)
        computing = sum(self.timings.get(k, 0.0) for k in ("map", "reduce"))
        self.timings["fetch"] = time.monotonic() - t - computing

    def tick(self, now: float) -> Tick:
        live = self.client.peers.live()
        for peer in live:
            self.peers.setdefault(peer.name, peer)
        names = frozenset(p.name for p in live)
        spares = tuple(p.name for p in select_nearest(live, self.job_id, len(live)))
        return Tick(now, names, spares, self.client.bus.connected, self.client.connections)

    def note_times(self, state: JobState, t: float) -> None:
        now = time.monotonic()
        if "download" not in self.timings and state.ready >= set(state.workers):
            self.timings["download"] = now - t
        if "map" not in self.timings and state.maps_done == len(state.maps):
            self.timings["map"] = now - t
        if "reduce" not in self.timings and state.reduces_done == len(state.reduces):
            self.timings["reduce"] = now - t - self.timings.get("map", 0.0)

    def event_of(self, result: GetResult) -> Event | None:
        """The state machine's event for a worker's report, or None for one that answers no
        request we sent that peer (a stale copy, or a forgery by another member)."""
        if result.re not in self.sent.get(result.peer, ()):
            log.warning("job %s: ignored a %s report from %s that answers no request of ours",
                        self.job_id, result.kind, result.peer)
            return None
        cids = tuple(str(c) for c in result.cids)
        try:
            self.payloads.take(result)
        except InlineMismatch as exc:  # a corrupt or lying worker: its attempt failed
            log.warning("job %s: %s", self.job_id, exc)
            phase = result.kind if result.kind in ("map", "reduce") else result.phase or "map"
            return Failed(result.peer, phase, result.task, result.attempt, str(exc))
        if result.kind == "ready":
            return Ready(result.peer)
        if result.kind == "map":
            return MapDone(result.peer, result.task, result.attempt, cids)
        if result.kind == "reduce":
            return ReduceDone(result.peer, result.task, result.attempt, cids)
        if result.kind == "error":
            return Failed(result.peer, result.phase or "map", result.task, result.attempt, result.error)
        return None

    def perform(self, commands: list[Command], fetcher: ThreadPoolExecutor) -> None:
        assert self.manifest is not None
        for c in commands:
            if isinstance(c, SendDownload):
                manifest = self.manifest.reissued([NodeName(n) for n in c.workers])
                code = self.payloads.outgoing("code", [(manifest.code[name], path.stat().st_size, path.read_bytes)
                                                       for name, path in self.code_files.items()])
                self.send(DOWNLOAD, c.peer, Download(manifest, inline=code))
            elif isinstance(c, SendDoMap):
                split = self.splits[c.task] if self.splits else None
                chunk = ([(self.manifest.chunks[c.task], split.length, partial(read_split, split))]
                         if split is not None and split.file.local is not None else [])
                inline = self.payloads.outgoing("chunks", chunk)
                self.send(DOMAP, c.peer, DoMap(self.job_id, c.task, c.attempt, inline=inline))
            elif isinstance(c, SendBuffer):
                self.send(BUFFER, c.peer, Buffer(self.job_id, c.partition, c.task, Cid(c.cid), c.attempt,
                                                 inline=self.payloads.relay(c.cid)))
            elif isinstance(c, SendRenew):
                self.send(RENEW, c.peer, Renew(self.job_id))
            else:
                path = self.staging / f"part-{c.partition:05d}"
                data = self.payloads.part(c.cid)
                future = (fetcher.submit(self.kubo.cat_to, c.cid, path) if data is None
                          else fetcher.submit(self.keep_part, c.cid, data, path))
                future.add_done_callback(lambda _: self.wake.put(None))
                self.fetches[c.partition] = future

    def keep_part(self, cid: str, data: bytes, path: Path) -> int:
        """A part its reducer reported inline: written out, and added to this node's kubo
        (unpinned: the result directory's pin holds it), where ``ipdc job get`` finds it."""
        path.write_bytes(data)
        (added,) = self.kubo.add_streams([(path.name, io.BytesIO(data))], pin=False)
        if added != cid:
            raise JobError(f"kubo names part {path.name} {added}, not {cid}: its import settings differ "
                           "from IPDC's (Import.CidVersion, chunker, raw leaves)")
        return len(data)

    def send(self, channel: Channel[Any], peer: str, message: Any) -> None:
        self.sent.setdefault(peer, set()).add(self.client.send(channel, peer, message))

    # -- results ---------------------------------------------------------------------
    def describe(self, output: Path) -> JobResult:
        assert self.manifest is not None and self.state is not None
        state = self.state
        names = {f"part-{r.index:05d}": Cid(r.output[0]) for r in state.reduces if r.output}
        sizes = {name: (self.staging / name).stat().st_size if single_block(cid)
                 else self.kubo.cumulative_size(cid)
                 for name, cid in names.items()}
        result_cid = self.kubo.make_directory(names, sizes)
        return JobResult(
            job_id=self.job_id, output=output.absolute(), result_cid=result_cid,
            workers=[{"name": n, "peer_id": self.peers[n].peer_id if n in self.peers else ""}
                     for n in state.workers],
            code=dict(self.manifest.code), chunks=list(self.manifest.chunks),
            parts=list(names.values()), map_tasks={m.index: m.by[0] for m in state.maps if m.by},
            input=input_text(self.job.input), input_cid=self.input_source().cid, input_bytes=self.input_bytes,
            submitted_at=self.manifest.submitted_at, reassigned=state.reassigned,
            lost=sorted(state.lost), verify=self.job.verify, cache_key=self.cache_key,
            tasks={"map": [task_record(t) for t in state.maps],
                   "reduce": [task_record(t) for t in state.reduces]},
        )

    def finish(self, result: JobResult) -> None:
        """Write job.json and _SUCCESS, then move the whole directory into place at once."""
        (self.staging / "job.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (self.staging / "_SUCCESS").touch()
        if result.output.exists():
            result.output.rmdir()  # checked empty before the job started
        result.output.parent.mkdir(parents=True, exist_ok=True)
        self.staging.rename(result.output)


def task_record(task: Task) -> dict[str, Any]:
    """What job.json and the job history say of one task: its final state, every attempt
    (times in seconds since the job started), and its story."""
    return {"kind": task.kind, "index": task.index, "state": task.state.value,
            "output": list(task.output or ()), "by": list(task.by), "failures": task.failures,
            "tried": list(task.tried),
            "attempts": [{"number": a.number, "peer": a.peer, "state": a.state, "started": a.started,
                          "ended": a.ended, "error": a.error} for a in task.attempts],
            "story": task.story}


def task_of(record: dict[str, Any]) -> Task:
    """The task a :func:`task_record` describes, for a controller that resumes the job."""
    return Task(record["kind"], record["index"], TaskState(record["state"]),
                [Attempt(a["number"], a["peer"], a["state"], started=a["started"], ended=a["ended"],
                         error=a["error"]) for a in record["attempts"]],
                failures=record["failures"], tried=list(record["tried"]),
                output=tuple(record["output"]) if record["output"] else None, by=tuple(record["by"]),
                story=list(record["story"]))
