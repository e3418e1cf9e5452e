"""The MapReduce controller's decisions, as a pure state machine.

In the manner of Dask's ``WorkerState.handle_stimulus``: :meth:`JobState.handle`
takes one event (a worker's report, a part fetched, a clock tick with the live
peers) and returns the commands it decides on (send a message, fetch a part). It
does no I/O, keeps no clock of its own and draws no random numbers, so every path
(a lost worker, a late or duplicate result, a retry, a broker reconnect, replicas
that disagree) is tested event by event in milliseconds. The thin shell that turns
MQTT and IPFS into events, and commands into messages, is
:class:`ipdc.submit.mapreduce.MapReduceController`.

The rules, which the README's "When workers are lost" section states for users:

* A worker is lost when it has been missing from the live set for ``will_grace``
  seconds with our own broker link up, and not within ``peer_timeout`` after our
  own reconnect (peers were silent *to us* then, not dead). A worker that has not
  answered the job's Download within ``ready_timeout`` is lost too: an agent that
  refuses a job (an untrusted key, a stale manifest) never answers, by design.
* The next XOR-nearest live peer (the first of the tick's ``spares``) joins in a
  lost worker's place. Its running map attempts are reserved for the replacement;
  its finished map outputs, which lived in its kubo, run again while a reduce may
  still need them (unless another peer produced the same output); its reduce
  attempts move to the replacement, which is sent every accepted map output. A
  reduce attempt that was fed output of the lost mapper starts over.
* Results are keyed by (task, attempt, peer): only an attempt that is still
  running counts, so duplicates and anything said after a worker was dropped are
  ignored, with a log line.
* A task that fails or loses its worker ``max_attempts`` times fails the job,
  naming the peers it was tried on, like Dask's KilledWorker. A retry goes to a peer
  that has not failed the task while there is one.
* With ``verify = N`` every task runs on N distinct peers, and an output is
  accepted only when N of them report the same CIDs (with ``majority``, when more
  than half do). Content addressing makes the comparison a string compare.
* After our own reconnect every outstanding request is sent again; the agents'
  handlers are idempotent.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ipdc.errors import JobError, TaskFailed, VerificationFailed

log = logging.getLogger(__name__)


class TaskState(enum.Enum):
    PENDING = "pending"
    """Map: needs an attempt. Reduce: some attempt still waits for its inputs."""
    RUNNING = "running"
    """Map: an attempt runs. Reduce: every attempt holds all its inputs."""
    DONE = "done"
    """The output is accepted."""
    FETCHED = "fetched"
    """Reduce only: the part is in the output directory."""


#: Every transition a task may make; anything else is a bug, caught at once.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.RUNNING}),
    TaskState.RUNNING: frozenset({TaskState.PENDING, TaskState.DONE}),
    TaskState.DONE: frozenset({TaskState.PENDING, TaskState.FETCHED}),
    TaskState.FETCHED: frozenset(),
}


# -- events --------------------------------------------------------------------------
@dataclass(frozen=True)
class Tick:
    """The clock, and the world as the shell sees it now."""

    now: float
    live: frozenset[str]
    """Names of the peers that are live now."""
    spares: tuple[str, ...] = ()
    """Live peers, XOR-nearest to the job first (the shell computes the distance)."""
    connected: bool = True
    """Whether our own broker link is up."""
    connections: int = 1
    """How many times our broker link was made: a rise means we were cut off."""


@dataclass(frozen=True)
class Ready:
    peer: str


@dataclass(frozen=True)
class MapDone:
    peer: str
    task: int
    attempt: int
    cids: tuple[str, ...]


@dataclass(frozen=True)
class ReduceDone:
    peer: str
    partition: int
    attempt: int
    cids: tuple[str, ...]


@dataclass(frozen=True)
class Failed:
    peer: str
    phase: str
    """"download", "map" or "reduce"."""
    task: int
    attempt: int
    error: str


@dataclass(frozen=True)
class PartFetched:
    partition: int
    error: str = ""
    """Empty when the part is in the staging directory."""


Event = Tick | Ready | MapDone | ReduceDone | Failed | PartFetched


# -- commands ------------------------------------------------------------------------
@dataclass(frozen=True)
class SendDownload:
    """Send the job's manifest, issued afresh with ``workers`` listed."""

    peer: str
    workers: tuple[str, ...]


@dataclass(frozen=True)
class SendDoMap:
    peer: str
    task: int
    attempt: int


@dataclass(frozen=True)
class SendBuffer:
    peer: str
    partition: int
    task: int
    cid: str
    attempt: int


@dataclass(frozen=True)
class SendRenew:
    peer: str


@dataclass(frozen=True)
class FetchPart:
    partition: int
    cid: str
    peer: str


Command = SendDownload | SendDoMap | SendBuffer | SendRenew | FetchPart


# -- the job's tasks -----------------------------------------------------------------
@dataclass
class Attempt:
    number: int
    peer: str
    state: str = "running"
    """"running", "done" (reported), "failed", "lost" or "superseded"."""
    cids: tuple[str, ...] = ()
    fed: dict[int, str] = field(default_factory=dict)
    """Reduce only: map task -> the mapper whose output was sent to this attempt."""
    started: float = 0.0
    """Seconds since the job started when the attempt was made (a task timeline's bar)."""
    ended: float | None = None
    """When it stopped running (reported, failed, lost or superseded); None while it runs."""
    error: str = ""
    """Why it failed or was lost (first line)."""


@dataclass
class Task:
    kind: str
    """"map" or "reduce"."""
    index: int
    state: TaskState = TaskState.PENDING
    attempts: list[Attempt] = field(default_factory=list)
    failures: int = 0
    """Attempts that failed or lost their worker; ``max_attempts`` of them fail the job."""
    tried: list[str] = field(default_factory=list)
    """Peers on which an attempt failed or was lost, in order."""
    output: tuple[str, ...] | None = None
    """The accepted CIDs."""
    by: tuple[str, ...] = ()
    """The peers whose attempts produced the accepted output."""
    reserved_for: str = ""
    """Map only: the replacement of the lost worker that ran it; no other worker takes it."""
    story: list[dict[str, Any]] = field(default_factory=list)
    """What happened to the task, in order, for job.json."""

    @property
    def label(self) -> str:
        return f"{self.kind} task {self.index}"

    def running(self) -> list[Attempt]:
        return [a for a in self.attempts if a.state == "running"]

    def attempt(self, number: int) -> Attempt | None:
        for a in self.attempts:
            if a.number == number:
                return a
        return None


@dataclass(frozen=True)
class Settings:
    partitions: int
    max_attempts: int = 3
    verify: int = 1
    """Distinct peers that must report the same output before it is accepted."""
    majority: bool = False
    """With ``verify`` > 1: accept what more than half of the replicas report."""
    will_grace: float = 0.5
    """A broker that shuts down publishes every client's last will, then drops us too."""
    peer_timeout: float = 10.0
    ready_timeout: float = 30.0
    renew_every: float = 30.0


class JobState:
    """One MapReduce job's tasks, workers and decisions."""

    def __init__(self, workers: list[tuple[str, int]], chunks: int, settings: Settings, now: float) -> None:
        """``workers``: (name, slots), XOR-nearest to the job first; reducer ``p`` starts on
        worker ``p`` (and the next ``verify - 1`` workers for its replicas)."""
        if settings.verify > len(workers):
            raise JobError(f"--verify {settings.verify} needs at least {settings.verify} workers, "
                           f"and the job has {len(workers)}")
        self.settings = settings
        self.started = now
        self.now = now
        self.workers: dict[str, int] = dict(workers)
        """Peers taking part now -> their slots, nearest the job first."""
        self.ready: set[str] = set()
        self.lost: dict[str, str] = {}
        """Peer -> why it was dropped."""
        self.invited: dict[str, float] = {name: now for name in self.workers}
        """Workers asked to join and not ready yet -> when they were asked."""
        self.missing: dict[str, float] = {}
        self.connections = 1
        self.reconnected_at = -float("inf")
        self.renewed = now
        self.spares: tuple[str, ...] = ()
        self.maps = [Task("map", i) for i in range(chunks)]
        self.reduces = [Task("reduce", p) for p in range(settings.partitions)]
        self.reassigned: list[dict[str, Any]] = []
        names = list(self.workers)
        for task in self.reduces:
            for r in range(settings.verify):
                self._new_reduce_attempt(task, names[(task.index + r) % len(names)], "planned")

    # -- the one entry point -----------------------------------------------------------
    def start(self) -> list[Command]:
        """The job's first commands: its manifest to every worker."""
        return [SendDownload(name, tuple(self.workers)) for name in self.workers]

    def restore(self, maps: list[Task], reduces: list[Task], lost: dict[str, str],
                reassigned: list[dict[str, Any]], elapsed: float) -> list[Command]:
        """Take up a job whose controller stopped (a crash, a kill -9) from what it recorded.

        Call it right after the constructor, with the workers the job had. Accepted
        outputs stay accepted, so an accepted map task is never sent again, and an
        accepted part is only fetched again by CID (the new staging directory is
        empty). Attempts that were running are superseded, since their requests died
        with the old controller; the next attempt of a task gets the next number, so a
        worker that still holds the job (within its lease) tells old from new, and
        answers a DoMap for a map it computed already from memory. States are set, not
        moved through TRANSITIONS: this recreates what was, it is not a step of the job.
        Returns the part fetches to make along with :meth:`start`'s Downloads.
        """
        self.started = self.now - elapsed
        self.lost, self.reassigned = dict(lost), list(reassigned)
        out: list[Command] = []
        for task in [*maps, *reduces]:
            for a in task.running():
                self._end(a, "superseded")
            task.reserved_for = ""
            reported = [a for a in task.attempts if a.state == "done"]
            if task.output is not None:
                task.state = TaskState.DONE
            elif task.kind == "map":
                task.state = TaskState.RUNNING if reported else TaskState.PENDING
            else:
                task.state = TaskState.PENDING
            self._note(task, "resumed", state=task.state.value)
            if task.kind == "reduce" and task.output is not None:
                out.append(FetchPart(task.index, task.output[0], task.by[0]))
            elif task.kind == "reduce":  # as planned at the start: partition p on the p-th worker
                names = list(self.workers)
                for r in range(len(reported), self.settings.verify):
                    self._new_reduce_attempt(task, names[(task.index + r) % len(names)],
                                             "the controller restarted")
        self.maps, self.reduces = list(maps), list(reduces)
        return out

    def handle(self, event: Event) -> list[Command]:
        """Apply one event; return what to do. Raises TaskFailed, VerificationFailed or
        JobError when the job can no longer succeed."""
        out: list[Command] = []
        if isinstance(event, Tick):
            self._tick(event, out)
        elif isinstance(event, PartFetched):
            self._fetched(event, out)
        elif event.peer not in self.workers:
            if isinstance(event, (MapDone, ReduceDone, Failed)):
                kind = "reduce" if isinstance(event, ReduceDone) else "map"
                kind = event.phase if isinstance(event, Failed) else kind
                number = event.partition if isinstance(event, ReduceDone) else event.task
                log.info("ignored late %s result for task %d attempt %d from %s (no longer a worker of the "
                         "job)", kind, number, event.attempt, event.peer)
            else:
                log.info("ignored a late %s from %s (no longer a worker of the job)",
                         type(event).__name__.lower(), event.peer)
        elif isinstance(event, Ready):
            self._ready(event.peer, out)
        elif isinstance(event, MapDone):
            self._map_done(event, out)
        elif isinstance(event, ReduceDone):
            self._reduce_done(event, out)
        else:
            self._failed(event, out)
        return out

    @property
    def done(self) -> bool:
        return all(t.state is TaskState.FETCHED for t in self.reduces)

    @property
    def maps_done(self) -> int:
        return sum(t.state is TaskState.DONE for t in self.maps)

    @property
    def reduces_done(self) -> int:
        return sum(t.state in (TaskState.DONE, TaskState.FETCHED) for t in self.reduces)

    # -- transitions -------------------------------------------------------------------
    def _move(self, task: Task, new: TaskState, why: str) -> None:
        if new not in TRANSITIONS[task.state]:
            raise AssertionError(f"{task.label}: {task.state.value} -> {new.value} is not a transition "
                                 f"({why})")
        task.state = new
        self._note(task, f"{new.value}", why=why)

    def _note(self, task: Task, event: str, **details: Any) -> None:
        task.story.append({"t": self.elapsed, "event": event, **details})

    @property
    def elapsed(self) -> float:
        """Seconds since the job started, as stories and attempts count time."""
        return round(self.now - self.started, 3)

    def _end(self, a: Attempt, state: str, error: str = "") -> None:
        """An attempt leaves ``running`` (or a reported one is set aside)."""
        if a.state == "running":
            a.ended = self.elapsed
        a.state = state
        if error:
            a.error = error.splitlines()[0][:200]

    # -- the clock: liveness, timeouts, renewals, reconnects ----------------------------
    def _tick(self, tick: Tick, out: list[Command]) -> None:
        self.now = tick.now
        self.spares = tick.spares
        if tick.connections != self.connections:
            self.connections = tick.connections
            self.reconnected_at = tick.now
            self.missing.clear()
            self._resend(out)
        settings = self.settings
        for name in list(self.workers):
            if name in tick.live:
                self.missing.pop(name, None)
                continue
            since = self.missing.setdefault(name, tick.now)
            if tick.now - since >= settings.will_grace and tick.connected \
                    and tick.now - self.reconnected_at > settings.peer_timeout:
                self._drop(name, "it stopped answering (its last will, or no heartbeat for "
                                 f"{settings.peer_timeout:g} s)", out)
        for name, asked in list(self.invited.items()):
            if name in self.workers and tick.now - asked > settings.ready_timeout and tick.connected:
                self._drop(name, f"it did not accept the job within {settings.ready_timeout:g} s: it may "
                                 "not trust this node's submitter key (run `ipdc trust add KEY` there, "
                                 "with KEY from `ipdc trust key` here), or be too busy", out)
        if tick.now - self.renewed >= settings.renew_every:
            self.renewed = tick.now
            out.extend(SendRenew(name) for name in self.workers)

    def _resend(self, out: list[Command]) -> None:
        """After our own reconnect: send again what the outage may have swallowed."""
        log.info("reconnected to the broker; sending outstanding requests again")
        for name in self.workers:
            if name not in self.ready:
                self.invited[name] = self.now
                out.append(SendDownload(name, tuple(self.workers)))
        for task in self.maps:
            for a in task.running():
                if a.peer in self.ready:
                    out.append(SendDoMap(a.peer, task.index, a.number))
        for task in self.reduces:
            for a in task.running():
                if a.peer in self.ready:
                    for index in a.fed:
                        out.append(self._buffer(task, a, self.maps[index]))

    # -- reports -------------------------------------------------------------------------
    def _ready(self, peer: str, out: list[Command]) -> None:
        if peer in self.ready:
            return
        self.ready.add(peer)
        self.invited.pop(peer, None)
        self._feed(out)
        self._dispatch(out)

    def _current(self, task: Task, number: int, peer: str, what: str) -> Attempt | None:
        """The attempt a report is about, if it still counts."""
        a = task.attempt(number)
        if a is None or a.peer != peer or a.state != "running":
            log.info("ignored late %s result for task %d attempt %d from %s", what, task.index, number, peer)
            return None
        return a

    def _map_done(self, event: MapDone, out: list[Command]) -> None:
        if not 0 <= event.task < len(self.maps):
            log.warning("ignored a report for unknown map task %d from %s", event.task, event.peer)
            return
        task = self.maps[event.task]
        a = self._current(task, event.attempt, event.peer, "map")
        if a is None:
            return
        if len(event.cids) != self.settings.partitions:
            self._fail_attempt(task, a, f"{task.label} returned {len(event.cids)} partitions, "
                                        f"not {self.settings.partitions}", out)
            return
        self._end(a, "done")
        a.cids = event.cids
        self._note(task, "reported", peer=a.peer, attempt=a.number)
        if task.state is TaskState.RUNNING and self._settle(task, out):
            self._move(task, TaskState.DONE, "output accepted")
            for other in task.running():  # a replica still running is not needed any more
                self._end(other, "superseded")
            self._feed(out)
        self._dispatch(out)

    def _reduce_done(self, event: ReduceDone, out: list[Command]) -> None:
        if not 0 <= event.partition < len(self.reduces):
            log.warning("ignored a report for unknown partition %d from %s", event.partition, event.peer)
            return
        task = self.reduces[event.partition]
        a = self._current(task, event.attempt, event.peer, "reduce")
        if a is None:
            return
        if len(event.cids) != 1:
            self._fail_attempt(task, a, f"{task.label} reported {len(event.cids)} parts, not 1", out)
            return
        if len(a.fed) != len(self.maps):
            log.warning("ignored a reduce result from %s for partition %d attempt %d, which was not sent "
                        "all its inputs", event.peer, task.index, a.number)
            return
        self._end(a, "done")
        a.cids = event.cids
        self._note(task, "reported", peer=a.peer, attempt=a.number)
        if task.state is TaskState.RUNNING and self._settle(task, out):
            self._move(task, TaskState.DONE, "output accepted")
            out.append(FetchPart(task.index, task.output[0], task.by[0]))  # type: ignore[index]

    def _settle(self, task: Task, out: list[Command]) -> bool:
        """Whether the task's reported attempts now agree enough to accept an output.

        Raises VerificationFailed when they never can: with a strict vote as soon as two
        replicas differ; with a majority vote once no replica runs, none can be added and
        no output has more than half of the votes.
        """
        reported = [a for a in task.attempts if a.state == "done"]
        votes = Counter(a.cids for a in reported)
        settings = self.settings
        needed = settings.verify // 2 + 1 if settings.majority else settings.verify
        for cids, count in votes.most_common():
            if count >= needed:
                task.output = cids
                task.by = tuple(a.peer for a in reported if a.cids == cids)
                return True
        if len(votes) > 1 and (not settings.majority or not task.running()):
            if settings.majority and self._more_replicas(task):
                if task.kind == "reduce":
                    self._new_reduce_attempt(task, self._reducer_for(task), "replicas disagree")
                    self._move(task, TaskState.PENDING, "one more replica to settle a vote")
                    self._feed(out)
                return False
            raise VerificationFailed(task.label, {a.peer: list(a.cids) for a in reported})
        return False

    def _more_replicas(self, task: Task) -> bool:
        """Whether one more replica may run: on a worker that has none, within max_attempts."""
        return len(task.attempts) < self.settings.verify + self.settings.max_attempts and any(
            name not in {a.peer for a in task.attempts} for name in self.workers)

    def _failed(self, event: Failed, out: list[Command]) -> None:
        if event.phase == "download":
            self._drop(event.peer, event.error, out)
            return
        tasks = self.reduces if event.phase == "reduce" else self.maps
        if not 0 <= event.task < len(tasks):
            log.warning("ignored an error for unknown %s task %d from %s", event.phase, event.task,
                        event.peer)
            return
        task = tasks[event.task]
        a = self._current(task, event.attempt, event.peer, f"{event.phase} error")
        if a is not None:
            self._fail_attempt(task, a, event.error, out)

    def _fetched(self, event: PartFetched, out: list[Command]) -> None:
        task = self.reduces[event.partition]
        if task.state is not TaskState.DONE:
            return
        if not event.error:
            self._move(task, TaskState.FETCHED, "part copied to the output")
            return
        peer = task.by[0]
        for a in task.attempts:
            if a.state == "done":
                self._end(a, "superseded")
        task.output, task.by = None, ()
        self._move(task, TaskState.PENDING, f"could not fetch the part from {peer}")
        self._count(task, peer, f"could not fetch part {task.index} from {peer}: {event.error}")
        self._new_reduce_attempt(task, self._reducer_for(task), "retry")
        self._feed(out)

    # -- failures and losses -------------------------------------------------------------
    def _count(self, task: Task, peer: str, error: str) -> None:
        """Note a failed or lost attempt; after max_attempts of them the job fails."""
        task.failures += 1
        task.tried.append(peer)
        self._note(task, "failed", peer=peer, error=error.splitlines()[0][:200] if error else "")
        if task.failures >= self.settings.max_attempts:
            raise TaskFailed(
                f"{task.label} failed {task.failures} time(s), on {', '.join(task.tried)} "
                f"(--max-attempts {self.settings.max_attempts}); the last error, from {peer}:\n{error}",
                peer=peer, remote_traceback=error)

    def _fail_attempt(self, task: Task, a: Attempt, error: str, out: list[Command]) -> None:
        """An attempt failed: retry elsewhere, or fail the job after max_attempts."""
        self._end(a, "failed", error)
        self._count(task, a.peer, error)
        log.warning("%s attempt %d failed on %s; retrying (%d of %d)", task.label, a.number, a.peer,
                    task.failures + 1, self.settings.max_attempts)
        if task.kind == "map":
            task.reserved_for = ""
            if task.state is TaskState.RUNNING and not task.running() and not self._reported(task):
                self._move(task, TaskState.PENDING, f"attempt {a.number} failed on {a.peer}")
            self._dispatch(out)
        else:
            if task.state is TaskState.RUNNING:
                self._move(task, TaskState.PENDING, f"attempt {a.number} failed on {a.peer}")
            self._new_reduce_attempt(task, self._reducer_for(task), "retry")
            self._feed(out)

    @staticmethod
    def _reported(task: Task) -> bool:
        return any(a.state == "done" for a in task.attempts)

    def _drop(self, name: str, reason: str, out: list[Command]) -> None:
        """Take a lost worker out of the job; its tasks go to the next XOR-nearest live peer."""
        log.warning("worker %s lost: %s", name, reason.splitlines()[0] if reason else "")
        self.workers.pop(name)
        self.ready.discard(name)
        self.invited.pop(name, None)
        self.missing.pop(name, None)
        self.lost[name] = reason
        replacement = self._recruit(out)
        for task in self.maps:
            if task.reserved_for == name:  # the replacement itself was lost: pass the task on
                task.reserved_for = replacement or ""
        if not self.workers:
            raise JobError(f"every worker was lost (the last, {name}: {reason}); check the nodes with "
                           "`ipdc peers` and submit again")
        needed = not self.done
        lost_outputs: set[int] = set()
        for task in self.maps:
            for a in task.running():
                if a.peer == name:
                    self._end(a, "lost", reason)
                    self._count(task, name, f"its worker {name} was lost while running it ({reason}); like "
                                            "Dask's KilledWorker, the task may be what kills workers")
                    self._reassign(task, name, replacement, a.number)
                    task.reserved_for = replacement or ""
            if task.state is TaskState.RUNNING and not task.running() and not self._reported(task):
                self._move(task, TaskState.PENDING, f"its worker {name} was lost")
            if task.state is TaskState.DONE and needed and set(task.by) <= set(self.lost):
                # its output lived in the lost nodes' kubo, which may be gone too: compute it again
                self._reassign(task, name, replacement, None)
                for a in task.attempts:
                    if a.state == "done":
                        self._end(a, "superseded")
                task.output, task.by = None, ()
                self._move(task, TaskState.PENDING, f"its output was on {name}, which was lost")
                lost_outputs.add(task.index)
        for task in self.reduces:
            if task.state in (TaskState.DONE, TaskState.FETCHED):
                continue
            for a in task.running():
                if a.peer == name:
                    self._end(a, "lost", reason)
                    if len(a.fed) == len(self.maps):  # it was reducing when it was lost
                        self._count(task, name, f"its worker {name} was lost while reducing ({reason})")
                    self._reassign(task, name, replacement, a.number)
                    self._new_reduce_attempt(task, replacement or self._reducer_for(task), f"{name} was lost")
                elif lost_outputs & set(a.fed):
                    self._end(a, "superseded")  # it holds output of the lost mapper: start it over
                    self._new_reduce_attempt(task, a.peer, f"it was fed output of {name}, which was lost")
            if task.state is TaskState.RUNNING and any(len(a.fed) < len(self.maps) for a in task.running()):
                self._move(task, TaskState.PENDING, f"an attempt restarted after {name} was lost")
        self._feed(out)
        self._dispatch(out)

    def _reassign(self, task: Task, lost: str, replacement: str | None, attempt: int | None) -> None:
        self.reassigned.append({"kind": task.kind, "task": task.index, "from": lost, "to": replacement or "",
                                "attempt": attempt})

    def _recruit(self, out: list[Command]) -> str | None:
        """The next XOR-nearest live peer not yet in the job, asked to join it."""
        taken = set(self.workers) | set(self.lost)
        spare = next((name for name in self.spares if name not in taken), None)
        if spare is None:
            log.warning("no spare peer; the remaining workers take over")
            return None
        log.info("%s joins as a replacement worker", spare)
        self.workers[spare] = max(self.workers.values(), default=1)
        self.invited[spare] = self.now
        out.append(SendDownload(spare, tuple(self.workers)))
        return spare

    def _reducer_for(self, task: Task) -> str:
        """A worker for a reduce retry: one that holds no attempt of it and has not failed
        it, nearest the job first; else any worker."""
        busy = {a.peer for a in task.running()}
        for name in self.workers:
            if name not in task.tried and name not in busy:
                return name
        for name in self.workers:
            if name not in busy:
                return name
        return next(iter(self.workers))

    # -- work to hand out -----------------------------------------------------------------
    def _new_reduce_attempt(self, task: Task, peer: str, why: str) -> None:
        number = max((a.number for a in task.attempts), default=-1) + 1
        task.attempts.append(Attempt(number, peer, started=self.elapsed))
        self._note(task, "assigned", peer=peer, attempt=number, why=why)

    def _buffer(self, task: Task, a: Attempt, source: Task) -> SendBuffer:
        assert source.output is not None
        return SendBuffer(a.peer, task.index, source.index, source.output[task.index], a.number)

    def _feed(self, out: list[Command]) -> None:
        """Give each ready reduce attempt every accepted map output it lacks."""
        for task in self.reduces:
            if task.state in (TaskState.DONE, TaskState.FETCHED):
                continue
            for a in task.running():
                if a.peer not in self.ready:
                    continue
                for source in self.maps:
                    if source.state is TaskState.DONE and source.index not in a.fed:
                        a.fed[source.index] = source.by[0]
                        out.append(self._buffer(task, a, source))
            if task.state is TaskState.PENDING and task.running() \
                    and all(len(a.fed) == len(self.maps) for a in task.running()):
                self._move(task, TaskState.RUNNING, "every input sent")

    def _inflight(self) -> Counter[str]:
        return Counter(a.peer for t in self.maps for a in t.running())

    def _dispatch(self, out: list[Command]) -> None:
        """Fill free slots of ready workers with map attempts, nearest worker first."""
        inflight = self._inflight()
        for name, slots in self.workers.items():
            while name in self.ready and inflight[name] < max(1, slots):
                task = self._next_map_for(name)
                if task is None:
                    break
                number = max((a.number for a in task.attempts), default=-1) + 1
                task.attempts.append(Attempt(number, name, started=self.elapsed))
                if task.state is TaskState.PENDING:
                    self._move(task, TaskState.RUNNING, f"attempt {number} sent to {name}")
                else:
                    self._note(task, "replica", peer=name, attempt=number)
                inflight[name] += 1
                out.append(SendDoMap(name, task.index, number))

    def _next_map_for(self, name: str) -> Task | None:
        workers = set(self.workers)
        for task in self.maps:
            if task.state not in (TaskState.PENDING, TaskState.RUNNING):
                continue
            if task.reserved_for not in ("", name):
                continue
            active = [a for a in task.attempts if a.state in ("running", "done")]
            wanted = self.settings.verify - len(active)
            if wanted <= 0 and not (self.settings.majority and self._undecided(task)):
                continue
            if name in {a.peer for a in active}:
                continue
            # a task goes back to a peer that failed it only when every worker has
            if name in task.tried and not workers <= set(task.tried):
                continue
            return task
        return None

    def _undecided(self, task: Task) -> bool:
        """A majority vote whose replicas all reported and disagree: one more may settle it."""
        votes = {a.cids for a in task.attempts if a.state == "done"}
        return not task.running() and len(votes) > 1 and self._more_replicas(task)
