"""The agent's per-job task table, as a pure state machine.

Every method takes one authenticated request (the shell has already checked the
signature, the trust list, the recipient and the nonce) or one outcome of the
agent's own work, and returns the actions to take. Nothing here does I/O, so the
rules are tested message by message, and every message twice:

* Jobs are keyed by (submitter key, job id): a message can only ever reach the job
  its own signer submitted, so no member can steer another's job, even by reusing
  its id.
* Every handler is idempotent, because QoS 1 may deliver a message twice and a
  submitter sends everything again after its own reconnect. A repeated request is
  answered from what was computed (or from the error it met), under the new
  request's digest, and never runs anything twice.
* A request for a job this node does not hold is refused (logged, not answered);
  one for a job it has finished is ignored, except a Download, which its submitter
  sends only to take the job up (a controller resumed after the lease): it is answered
  with why the job ended here, so that the controller fails at once rather than after
  ``agent.ready_timeout``.
* A job whose submitter has said nothing for the lease is dropped, as if cleaned up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ipdc.wire.getresult import GetResult, clip
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest

#: How many finished jobs are remembered, so late duplicates are recognised.
REMEMBERED_JOBS = 4096

JobKey = tuple[str, str]
"""(submitter key, job id)."""


def key_of(manifest: JobManifest) -> JobKey:
    return (manifest.submitter, str(manifest.job_id))


# -- actions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fetch:
    """Fetch the job's code into its work dir, then call :meth:`JobTable.fetched`."""

    key: JobKey
    manifest: JobManifest


@dataclass(frozen=True)
class Report:
    result: GetResult


@dataclass(frozen=True)
class Prepare:
    """Bind a runner to the job now: most workers will run one of its tasks."""

    key: JobKey


@dataclass(frozen=True)
class RunMap:
    key: JobKey
    task: int
    attempt: int
    chunk: Cid
    re: str


@dataclass(frozen=True)
class RunReduce:
    key: JobKey
    partition: int
    attempt: int
    inputs: tuple[Cid, ...]
    """One map output per map task, in task order."""
    re: str


@dataclass(frozen=True)
class Drop:
    """Stop the job's runners, delete its work dir, unpin what it made."""

    key: JobKey
    created: tuple[Cid, ...]
    why: str


@dataclass(frozen=True)
class Unpin:
    """Output of a task that finished after its job was dropped."""

    cids: tuple[Cid, ...]


@dataclass(frozen=True)
class Note:
    """A line for the agent's log: why a request was not acted on."""

    text: str


Action = Fetch | Report | Prepare | RunMap | RunReduce | Drop | Unpin | Note


@dataclass
class HeldJob:
    manifest: JobManifest
    ready: bool = False
    """Its code is fetched."""
    last_heard: float = 0.0
    maps: dict[int, list[Cid]] = field(default_factory=dict)
    """Map task -> its partition CIDs, from whichever attempt ran here first."""
    buffers: dict[tuple[int, int], dict[int, Cid]] = field(default_factory=dict)
    """(partition, reduce attempt) -> map task -> CID."""
    reduces: dict[tuple[int, int], list[Cid]] = field(default_factory=dict)
    started: set[tuple[str, int, int]] = field(default_factory=set)
    """("map" | "reduce", task, attempt) already started here."""
    failed: dict[tuple[str, int, int], str] = field(default_factory=dict)
    """The same keys -> the error reported, for a request that comes again."""
    created: list[Cid] = field(default_factory=list)
    ready_re: str = ""
    """The digest of the newest Download: the ``ready`` answers it."""


class JobTable:
    """Every job this agent holds, and what it has done of each."""

    def __init__(self, node: str) -> None:
        self.node = NodeName(node)
        self.jobs: dict[JobKey, HeldJob] = {}
        self.finished: OrderedDict[JobKey, str] = OrderedDict()
        """Jobs that ended here -> why."""

    def _result(self, key: JobKey, kind: str, re: str, **fields: object) -> Report:
        return Report(GetResult(JobId(key[1]), self.node, kind, re=re, **fields))  # type: ignore[arg-type]

    def _held(self, key: JobKey, what: str, now: float) -> HeldJob | Note:
        job = self.jobs.get(key)
        if job is None:
            state = "finished" if key in self.finished else "unknown"
            return Note(f"ignored {what}: the job is {state} here")
        job.last_heard = now
        return job

    # -- requests ------------------------------------------------------------------------
    def download(self, manifest: JobManifest, re: str, now: float) -> list[Action]:
        key = key_of(manifest)
        if key in self.finished:
            why = f"job {manifest.job_id} ended on {self.node}: {self.finished[key]}"
            return [Note(f"refused download of job {manifest.job_id}: the job is finished here"),
                    self._result(key, "error", re, phase="download", error=clip(why))]
        job = self.jobs.get(key)
        if job is not None:  # a duplicate, or the owner asking again after an outage
            job.last_heard, job.ready_re = now, re
            return [self._result(key, "ready", re)] if job.ready else []
        self.jobs[key] = HeldJob(manifest, last_heard=now, ready_re=re)
        return [Fetch(key, manifest)]

    def fetched(self, key: JobKey, error: str, now: float) -> list[Action]:
        """The job's code is in its work dir (``error`` empty), or could not be fetched."""
        job = self.jobs.get(key)
        if job is None:  # dropped while we fetched
            return [Drop(key, (), "it was cleaned up while its code was fetched")]
        if error:
            del self.jobs[key]
            return [self._result(key, "error", job.ready_re, phase="download", error=clip(error))]
        job.ready, job.last_heard = True, now
        actions: list[Action] = [self._result(key, "ready", job.ready_re)]
        if job.manifest.kind == "mapreduce":
            actions.append(Prepare(key))
        for (partition, attempt), got in job.buffers.items():  # a full set that came early
            mark = ("reduce", partition, attempt)
            if len(got) == len(job.manifest.chunks) and mark not in job.started:
                job.started.add(mark)
                inputs = tuple(got[t] for t in range(len(job.manifest.chunks)))
                actions.append(RunReduce(key, partition, attempt, inputs, job.ready_re))
        return actions

    def domap(self, key: JobKey, task: int, attempt: int, re: str, now: float) -> list[Action]:
        what = f"domap {task} (attempt {attempt}) of job {key[1]}"
        job = self._held(key, what, now)
        if isinstance(job, Note):
            return [job]
        if not job.ready:
            return [Note(f"ignored {what}: its code is still being fetched")]
        if not 0 <= task < len(job.manifest.chunks):
            return [Note(f"refused {what}: the job has {len(job.manifest.chunks)} map tasks")]
        mark = ("map", task, attempt)
        if task in job.maps:  # computed here already: answer under this attempt, do not recompute
            return [self._result(key, "map", re, task=task, attempt=attempt, cids=job.maps[task])]
        if mark in job.failed:  # failed here: say so again, the first report may have been lost
            return [self._result(key, "error", re, task=task, attempt=attempt, phase="map",
                                 error=job.failed[mark])]
        if mark in job.started:
            return []
        job.started.add(mark)
        return [RunMap(key, task, attempt, job.manifest.chunks[task], re)]

    def buffer(self, key: JobKey, partition: int, task: int, cid: Cid, attempt: int, re: str,
               now: float) -> list[Action]:
        what = f"buffer {task}->{partition} (attempt {attempt}) of job {key[1]}"
        job = self._held(key, what, now)
        if isinstance(job, Note):
            return [job]
        manifest = job.manifest
        if not 0 <= partition < manifest.partitions or not 0 <= task < len(manifest.chunks):
            return [Note(f"refused {what}: partition or task out of range")]
        slot = (partition, attempt)
        mark = ("reduce", partition, attempt)
        if slot in job.reduces:  # the owner sent the set again: it may have missed our answer
            return [self._result(key, "reduce", re, task=partition, attempt=attempt, cids=job.reduces[slot])]
        if mark in job.failed:
            return [self._result(key, "error", re, task=partition, attempt=attempt, phase="reduce",
                                 error=job.failed[mark])]
        got = job.buffers.setdefault(slot, {})
        got.setdefault(task, cid)
        if len(got) < len(manifest.chunks) or mark in job.started or not job.ready:
            return []
        job.started.add(mark)
        return [RunReduce(key, partition, attempt, tuple(got[t] for t in range(len(manifest.chunks))), re)]

    def renew(self, key: JobKey, now: float) -> list[Action]:
        job = self._held(key, f"renew of job {key[1]}", now)
        return [job] if isinstance(job, Note) else []

    def cleanup(self, key: JobKey) -> list[Action]:
        job = self.jobs.pop(key, None)
        if job is None:
            state = "finished" if key in self.finished else "unknown"
            return [Note(f"refused cleanup of job {key[1]}: the job is {state} here")]
        why = "its submitter cleaned it up"
        self._remember(key, why)
        return [Drop(key, tuple(job.created), why)]

    def expire(self, now: float, lease: float) -> list[Action]:
        """Drop every job whose submitter has been silent longer than ``lease``."""
        actions: list[Action] = []
        for key, job in list(self.jobs.items()):
            if now - job.last_heard > lease:
                del self.jobs[key]
                silence = f"its submitter has said nothing for {now - job.last_heard:.0f} s (agent.job_lease)"
                self._remember(key, f"it was dropped: {silence}")
                actions.append(Drop(key, tuple(job.created), silence))
        return actions

    def _remember(self, key: JobKey, why: str) -> None:
        self.finished[key] = why
        while len(self.finished) > REMEMBERED_JOBS:
            self.finished.popitem(last=False)

    # -- outcomes of the agent's own work ------------------------------------------------------
    def task_done(self, key: JobKey, kind: str, task: int, attempt: int, cids: list[Cid],
                  stats: dict[str, float], re: str) -> list[Action]:
        job = self.jobs.get(key)
        if job is None:  # the job was dropped while the task ran: its output is litter
            return [Unpin(tuple(cids))]
        job.created.extend(cids)
        if kind == "map":
            cids = job.maps.setdefault(task, cids)
        else:
            job.reduces[(task, attempt)] = cids
        return [self._result(key, kind, re, task=task, attempt=attempt, cids=cids, stats=stats)]

    def task_failed(self, key: JobKey, kind: str, task: int, attempt: int, error: str,
                    re: str) -> list[Action]:
        job = self.jobs.get(key)
        if job is None:
            return []
        error = clip(error)
        job.failed[(kind, task, attempt)] = error
        return [self._result(key, "error", re, task=task, attempt=attempt, phase=kind, error=error)]
