"""One job inside the controller service: its controller thread, and its record in the
job history as it goes.

A run is the :class:`~ipdc.submit.mapreduce.Observer` of its controller. It writes
the job's tasks and attempts to the history whenever a task's output is accepted
(at once: an accepted output must never be computed again after a restart) and
otherwise at most every :data:`PERSIST_EVERY` seconds, and it wakes whoever
watches the job (the blocking ``ipdc mr``, the dashboard).

What a restarted service needs to take the job up is written as soon as the
input is uploaded (the plan: the manifest and the input's size), so a job is
resumable from then on; a job killed before that simply starts again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ipdc.control.cache import Keyed, find_cached, job_key, publish_cached
from ipdc.control.history import History
from ipdc.control.swarm import publish_record, write_result
from ipdc.errors import HistoryError, IPDCError, JobCancelled
from ipdc.kubo import KuboClient
from ipdc.submit.client import SwarmClient
from ipdc.submit.inputs import input_text, parse_input
from ipdc.submit.mapreduce import JobResult, MapReduceController, MapReduceJob, Resume, task_of, task_record
from ipdc.submit.mrstate import Task
from ipdc.trust import Signer, TrustStore
from ipdc.wire.ids import JobId
from ipdc.wire.manifest import JobManifest
from ipdc.wire.schema import build

log = logging.getLogger(__name__)

#: Seconds between writes of a running job's tasks when no output was accepted meanwhile.
PERSIST_EVERY = 0.5


@dataclass(frozen=True)
class Context:
    """What every run of one service shares."""

    client: SwarmClient
    kubo: KuboClient
    history: History
    signer: Signer
    home: Path
    changed: Callable[[], None]
    """Tell the service's watchers (dashboards) that something changed."""
    trust: TrustStore
    """The keys whose cached results this node uses."""


def job_params(job: MapReduceJob) -> dict[str, Any]:
    """The job as the history keeps it (and a restarted service rebuilds it from)."""
    return {"input": input_text(job.input), "k": job.k, "map_file": str(job.map_file),
            "reduce_file": str(job.reduce_file), "chunks": job.chunks, "max_attempts": job.max_attempts,
            "verify": job.verify, "verify_majority": job.verify_majority, "mapper": job.mapper,
            "reducer": job.reducer, "combiner": job.combiner, "files": [str(f) for f in job.files],
            "cache": job.cache}


def job_of(params: dict[str, Any], output: str | None) -> MapReduceJob:
    """The job of a record or a submitted spec; ``output`` None: the default, not made yet."""
    return MapReduceJob(input=parse_input(params["input"]), k=params["k"], map_file=Path(params["map_file"]),
                        reduce_file=Path(params["reduce_file"]), output=Path(output) if output else None,
                        chunks=params["chunks"],
                        max_attempts=params["max_attempts"], verify=params["verify"],
                        verify_majority=params["verify_majority"], cache=params.get("cache", True),
                        **streaming_of(params))


def streaming_of(params: dict[str, Any]) -> dict[str, Any]:
    """A job's Hadoop Streaming fields, from a submitted spec or a record (where a job
    recorded before they existed has none)."""
    return {"mapper": params.get("mapper"), "reducer": params.get("reducer"), "combiner": params.get("combiner"),
            "files": tuple(Path(f) for f in params.get("files") or ())}


def resume_of(row: dict[str, Any]) -> Resume | None:
    """How to take up a recorded job (``History.job``), or None to start it over."""
    plan = row["plan"]
    if plan is None:
        return None
    manifest = build(JobManifest, plan["manifest"], "plan.manifest", HistoryError)

    def tasks(kind: str, count: int) -> list[Task]:
        recorded = [task_of(t) for t in row["tasks"][kind]]
        return recorded if len(recorded) == count else [Task(kind, i) for i in range(count)]

    return Resume(manifest=manifest, workers=[(str(n), int(s)) for n, s in row["workers"]],
                  maps=tasks("map", len(manifest.chunks)), reduces=tasks("reduce", manifest.partitions),
                  lost=row["lost"], reassigned=row["reassigned"],
                  elapsed=time.time() - (row["started_at"] or time.time()), input_bytes=plan["input_bytes"])


class Versioned(Protocol):
    version: int


def moved(watched: Versioned, seen: int) -> bool:
    """For ``Condition.wait_for``: whether ``watched`` changed since its version ``seen``."""
    return watched.version != seen


class JobRun:
    """A job of this node: queued, then run by a controller on a thread of the service."""

    def __init__(self, ctx: Context, job_id: str, job: MapReduceJob, submitted_at: float,
                 resume: Resume | None = None, started_at: float | None = None) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.job = job
        self.submitted_at = submitted_at
        self.resume = resume
        self.started_at = started_at
        self.state = "queued"
        self.progress: dict[str, list[float]] = {}
        """Phase ("upload", "map", "reduce") -> [done, total]."""
        self.summary: dict[str, Any] | None = None
        self.error = ""
        self.exit_code = 0
        self.controller: MapReduceController | None = None
        self.changed = threading.Condition()
        self.version = 0
        """Grows with every change a watcher may want to see."""
        self._cancel = threading.Event()
        self._persisted = (0.0, (-1, -1), 0)
        """(when, (maps done, reduces done), story events) of the last write of the tasks."""

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    def snapshot(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "progress": self.progress, "error": self.error,
                "exit_code": self.exit_code, "result": self.summary, "cancelled": self.state == "cancelled"}

    def _notify(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()
        self.ctx.changed()

    # -- the controller thread --------------------------------------------------------------
    def run(self) -> None:
        history = self.ctx.history
        if self._cancel.is_set():
            self._end("cancelled", f"job {self.job_id} was cancelled before it started",
                      JobCancelled.exit_code)
            return
        self.started_at = self.started_at or time.time()
        self.state = "running"
        history.update(self.job_id, state="running", started_at=self.started_at)
        self._notify()
        controller = self.controller = MapReduceController(
            self.ctx.client, self.ctx.kubo, self.job, self.ctx.home, self._progress,
            job_id=JobId(self.job_id), observer=self, resume=self.resume)
        controller.release_later = True
        if self._cancel.is_set():
            controller.cancelled.set()
        try:
            keyed = job_key(self.ctx.client, controller)
            result = self._cached(keyed) if self.job.cache and self.resume is None else None
            if result is None:
                controller.cache_key = keyed.key
                result = controller.run()
        except JobCancelled as exc:
            self._end("cancelled", str(exc), exc.exit_code)
        except IPDCError as exc:
            self._end("failed", str(exc), exc.exit_code)
        except Exception as exc:  # a bug in one job must not take the service down
            log.exception("job %s: the controller crashed", self.job_id)
            self._end("failed", f"the controller crashed ({type(exc).__name__}: {exc}); "
                                "see logs/control.log", 1)
        else:
            self.summary = result.to_dict()
            history.update(self.job_id, result_cid=result.result_cid)
            try:
                publish_record(self.ctx.client, self.ctx.signer, self.job_id, result.result_cid,
                               len(result.parts), self.submitted_at)
                if not result.cached:
                    publish_cached(self.ctx.client, self.ctx.signer, keyed.key, result.result_cid,
                                   self.job_id)
            except IPDCError as exc:  # the job succeeded; only `ipdc job get` and the cache miss it
                log.warning("job %s: could not publish its result and cache records: %s", self.job_id, exc)
            self._end("succeeded", "", 0)
            controller.release()  # after the user has the result

    def _cached(self, keyed: Keyed) -> JobResult | None:
        """The job's result from the swarm's cache, written to its output directory; None when
        no trusted member has a retrievable one (or the lookup itself failed: the job runs)."""
        started = time.monotonic()
        try:
            record = find_cached(self.ctx.client, self.ctx.trust, self.ctx.kubo, keyed.key)
        except IPDCError as exc:
            log.warning("job %s: could not look up the cache, so the job runs: %s", self.job_id, exc)
            return None
        if record is None:
            return None
        log.info("job %s: cached, the result of job %s of %s", self.job_id, record.job_id, record.owner)
        output = self.job.output or Path("ipdc-out") / self.job_id
        try:
            parts = self.ctx.kubo.ls(record.result_cid)
            result = JobResult(
                job_id=self.job_id, output=output.absolute(), result_cid=record.result_cid, workers=[],
                code=keyed.code, chunks=[], parts=[parts[name] for name in sorted(parts)], map_tasks={},
                input=input_text(self.job.input), input_bytes=keyed.input_bytes, submitted_at=self.submitted_at,
                input_cid=keyed.input_cid, cache_key=keyed.key, cached=True, cached_from=record.job_id,
                verify=self.job.verify)
            result.timings = {"total": time.monotonic() - started}
            write_result(self.ctx.kubo, record.result_cid, output, json.dumps(result.to_dict(), indent=2) + "\n")
        except IPDCError as exc:  # not a directory of parts (the record lied), or no room for it: the job runs
            log.warning("job %s: the cached result %s of %s was not written, so the job runs: %s", self.job_id,
                        record.result_cid, record.owner, exc)
            return None
        return result

    def _end(self, state: str, error: str, exit_code: int) -> None:
        if self.controller is not None:
            self._persist(self.controller)
        self.state, self.error, self.exit_code = state, error, exit_code
        self.ctx.history.update(self.job_id, state=state, error=error, finished_at=time.time(),
                                progress=self.progress, summary=self.summary)
        log.info("job %s %s%s", self.job_id, state, f": {error.splitlines()[0]}" if error else "")
        self._notify()

    def cancel(self) -> None:
        """Ask the job to stop; it ends ``cancelled`` once CleanUp has gone to every peer."""
        self._cancel.set()
        if self.controller is not None:
            self.controller.cancelled.set()

    def _progress(self, phase: str, done: float, total: float) -> None:
        if self.progress.get(phase) != [done, total]:
            self.progress = {**self.progress, phase: [done, total]}
            self._notify()

    # -- the controller's observer --------------------------------------------------------------
    def planned(self, controller: MapReduceController) -> None:
        assert controller.manifest is not None
        # the workers too: a service killed before the first progress write would otherwise
        # take the job up with none, and wait for ever
        self.ctx.history.update(self.job_id, plan={"manifest": dataclasses.asdict(controller.manifest),
                                                   "input_bytes": controller.input_bytes},
                                workers=[[name, slots] for name, slots in controller.workers])

    def progressed(self, controller: MapReduceController) -> None:
        state = controller.state
        if state is None:
            return
        when, counts, events = self._persisted
        now = time.monotonic()
        new_counts = (state.maps_done, state.reduces_done)
        if new_counts != counts or (now - when >= PERSIST_EVERY and self._events(controller) != events):
            self._persist(controller)

    @staticmethod
    def _events(controller: MapReduceController) -> int:
        state = controller.state
        assert state is not None
        return sum(len(t.story) for t in (*state.maps, *state.reduces))

    def _persist(self, controller: MapReduceController) -> None:
        state = controller.state
        if state is None:
            return
        self.ctx.history.save_tasks(self.job_id, [task_record(t) for t in (*state.maps, *state.reduces)])
        self.ctx.history.update(self.job_id, progress=self.progress, lost=state.lost,
                                reassigned=state.reassigned,
                                workers=[[name, slots] for name, slots in state.workers.items()])
        self._persisted = (time.monotonic(), (state.maps_done, state.reduces_done), self._events(controller))
        self._notify()
