"""The Python API's submitter: :func:`connect` and :class:`Swarm`.

A Swarm is one session on this node's swarm, with the node's own credentials: its
broker identity (a client id of its own), its submitter key (every Task is signed
with it, so agents run them only where that key is trusted), its kubo (functions and
large arguments are added there once and travel by CID) and its trust list (a pickled
result is unpickled only when the worker's node key is in it).

One pump thread takes the workers' signed replies and settles the futures; it also
notices a worker that left (its presence cleared, or silent past ``agent.peer_timeout``)
and sends its tasks to another peer, up to ``max_attempts``. Tasks whose arguments
are futures wait here until those are done, and are then sent with the futures'
results by CID: the dependent task's worker fetches them from the worker that made
them.
"""

from __future__ import annotations

import base64
import logging
import math
import queue
import sys
import sysconfig
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipdc import ipdc_home
from ipdc.api.executor import SwarmExecutor
from ipdc.api.future import HERE, Future, Stored
from ipdc.api.mapreduce import run_mapreduce
from ipdc.api.offload import LOCAL, Candidate, Decision, Measured, decide
from ipdc.api.placement import choose
from ipdc.errors import ControlError, IPDCError, JobError, NotEnoughPeers, TaskFailed, ValueRefused
from ipdc.home import NodeHome
from ipdc.runner.pytask import decode, encode
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import JobResult
from ipdc.trust import Signer, verify
from ipdc.wire.ids import Cid, JobId
from ipdc.wire.task import TASK, TASK_REPLY, Task, TaskArg, TaskReply
from ipdc.wire.unixfs import cid_of

log = logging.getLogger(__name__)

#: Encoded arguments up to this size travel inside the Task; larger ones by CID.
INLINE_ARG = 64 << 10
#: Seconds between looks for workers that left.
WATCH_INTERVAL = 0.25


@dataclass
class _Task:
    """A task this session submitted and has not settled."""

    future: Future
    fn: Cid
    values: list[Any]
    """Its arguments as given: encoded TaskArgs, and futures not yet resolved to one."""
    kwargs: list[str]
    chunk: bool
    pin: str | None
    resources: dict[str, Any]
    attempt: int = -1
    sent_at: float = 0.0
    re: str = ""
    """The digest of the Task message now in flight: only its reply counts."""
    failures: list[str] = field(default_factory=list)


class Swarm:
    """A session on a swarm: submit Python functions to its peers."""

    def __init__(self, home: Path, *, max_attempts: int = 3, signer: Signer | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        """``home``: a running node's home. ``signer``: the key to sign tasks with (the node's
        by default). ``on_close``: also run by :meth:`close` (a temporary cluster's stop)."""
        self.node = NodeHome(home)
        self.config = self.node.config
        self.max_attempts = max_attempts
        self.signer = signer or self.node.signer
        self.kubo = self.node.kubo(timeout=600)
        self.trust = self.node.trust
        self.session = JobId.new()
        self._on_close = on_close
        self._lock = threading.RLock()
        self._tasks: dict[str, _Task] = {}
        self._waiting: list[_Task] = []
        self._in_flight: Counter[str] = Counter()
        self._functions: dict[int, tuple[Callable[..., Any], Cid]] = {}
        self._stored: set[str] = set()
        self._runs: dict[str, Measured] = {}
        self._result_sizes: dict[str, Measured] = {}
        self._rtts: dict[str, Measured] = {}
        self._bound: set[str] = set()
        """Peers that have answered this session once (their first answer includes a runner's start)."""
        self._bandwidths: dict[str, Measured] = {}
        self._here_running = 0
        self._here = ThreadPoolExecutor(self.config.slots, thread_name_prefix="ipdc-here")
        self.decisions: list[Decision] = []
        """Every :meth:`offload` decision, with its estimates and (once the call ended) outcome."""
        self._stop = threading.Event()
        self.client = SwarmClient(self.config, self.signer).connect()
        self._replies = self.client.listen(TASK_REPLY.subscription(job=self.session))
        self._pump = threading.Thread(target=self._run, daemon=True, name="ipdc-api")
        self._pump.start()

    # -- the contract --------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, peer: str | None = None,
               resources: dict[str, Any] | None = None, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a peer. A :class:`Future` among the arguments makes
        this task wait for it and take its result, fetched worker to worker."""
        return self._submit(fn, [*args, *kwargs.values()], list(kwargs), False, peer, resources or {})

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, chunksize: int | None = None,
            timeout: float | None = None, peer: str | None = None,
            resources: dict[str, Any] | None = None) -> Iterator[Any]:
        """``fn(item)`` for every item, in order, as :meth:`concurrent.futures.Executor.map`
        gives them. Items go ``chunksize`` per task (default: about four tasks per slot of
        the live peers)."""
        items = list(items)
        if chunksize is None:
            slots = sum(p.presence.slots for p in self.client.peers.live()) or 1
            chunksize = max(1, math.ceil(len(items) / (4 * slots)))
        futures = [self._submit(fn, [items[i:i + chunksize]], [], True, peer, resources or {})
                   for i in range(0, len(items), chunksize)]
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            try:
                for future in futures:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    yield from future.result(left)
            finally:
                for future in futures:
                    future.cancel()
        return results()

    def mapreduce(self, map_fn: Callable[..., Any], reduce_fn: Callable[..., Any], input_file: str | Path,
                  k: int = 4, combine: Callable[..., Any] | None = None, output: str | Path | None = None,
                  max_attempts: int = 3) -> JobResult:
        """Run a MapReduce job as ``ipdc mr`` does, with ``map_fn(line)`` (pairs),
        ``reduce_fn(key, values)`` and an optional ``combine(key, values)``; its JobResult
        (the output directory, the result CID, workers, timings)."""
        if k < 1 or max_attempts < 1:  # named as this call names them, not as the CLI's --k
            raise JobError(f"mapreduce: k and max_attempts must be at least 1, not k={k}, "
                           f"max_attempts={max_attempts}")
        for fn in (map_fn, reduce_fn, combine):
            if fn is not None:
                _by_value(fn)
        return run_mapreduce(self.node.home, map_fn, reduce_fn, Path(input_file), k, combine,
                             Path(output) if output is not None else None, max_attempts)

    def executor(self) -> SwarmExecutor:
        """A :class:`concurrent.futures.Executor` over this session."""
        return SwarmExecutor(self)

    def offload(self, fn: Callable[..., Any], /, *args: Any, policy: str = "auto", **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` here or on the peer where the cost model
        (:mod:`ipdc.api.offload`) expects the result soonest; ``policy`` "local" or "remote"
        forces the side. The decision and its estimates go to :attr:`decisions` and, when the
        call ends, to this node's job history (``ipdc jobs``)."""
        import cloudpickle
        fn_cid = self._function(fn)
        values = [*args, *kwargs.values()]
        arg_bytes = sum(len(encode(v, cloudpickle.dumps)[1]) for v in values if not isinstance(v, Future))
        me = self.config.node.name
        with self._lock:
            run = self._runs.get(fn_cid, Measured()).value
            result_bytes = int(self._result_sizes.get(fn_cid, Measured()).get(0.0))
            in_flight = dict(self._in_flight)
            here = self._here_running
            candidates = [Candidate(p.name, (p.running + in_flight.get(p.name, 0)) / max(1, p.presence.slots),
                                    self._rtts.get(p.name, Measured()).value,
                                    self._bandwidths.get(p.name, Measured()).value)
                          for p in self.client.peers.live() if p.name != me]
        own = next((p for p in self.client.peers.live() if p.name == me), None)
        local_load = ((own.running if own is not None else 0) + here) / self.config.slots
        choice, estimates = decide(policy, run, local_load, candidates, arg_bytes, result_bytes)
        decision = Decision(fn_cid, policy, choice, estimates, arg_bytes, result_bytes, time.time())
        self.decisions.append(decision)
        if choice == LOCAL:
            future = self._run_here(fn, fn_cid, args, kwargs)
        else:
            future = self._submit(fn, values, list(kwargs), False, choice, {})
        future.add_done_callback(lambda _: self._record(decision, future))
        return future

    def _run_here(self, fn: Callable[..., Any], fn_cid: Cid, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Future:
        """Call ``fn`` in this process (on a thread): an offload decided to stay here."""
        future = Future(str(JobId.new()), self._materialize, lambda _: None)
        future.peers.append(LOCAL)

        def call() -> None:
            with self._lock:
                self._here_running += 1
            t0 = time.monotonic()
            try:
                value = fn(*[a.result() if isinstance(a, Future) else a for a in args], **kwargs)
            except Exception as exc:  # the caller's own code: its exception is the outcome
                future.set_exception(exc)
            else:
                with self._lock:
                    self._runs.setdefault(fn_cid, Measured()).add(time.monotonic() - t0)
                future.set_result(Stored(HERE, None, None, True, LOCAL, value))
            finally:
                with self._lock:
                    self._here_running -= 1
        self._here.submit(call)
        return future

    def _record(self, decision: Decision, future: Future) -> None:
        """Keep an ended offload's outcome, and record it in the node's job history."""
        finished = time.time()
        error = "" if future.cancelled() or future.exception(0) is None else str(future.exception(0))
        decision.outcome.update(seconds=finished - decision.decided_at, peer=future.peer,
                                **({"error": error[:500]} if error else {}))
        state = "cancelled" if future.cancelled() else "failed" if error else "succeeded"
        from ipdc.ctlsock import ControlClient
        try:
            ControlClient(self.node.home, timeout=5).call(
                "record", kind="offload", params=decision.to_dict(), state=state, error=error[:500],
                workers=[[decision.choice]], submitted_at=decision.decided_at, finished_at=finished)
        except ControlError as exc:
            log.warning("offload decision not recorded in the job history: %s", exc)

    def close(self) -> None:
        """Cancel what still runs, unpin the functions and arguments this session added to
        kubo, disconnect, and stop a temporary cluster."""
        with self._lock:
            pending = [t.future for t in self._tasks.values()]
        for future in pending:
            future.cancel()
        self._stop.set()
        self._pump.join(timeout=5)
        self._here.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        if self._stored:
            try:
                self.kubo.pin_rm(*self._stored)
            except IPDCError as exc:
                log.warning("could not unpin this session's inputs: %s", exc)
        self.kubo.close()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting ----------------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], values: list[Any], kwargs: list[str], chunk: bool,
                pin: str | None, resources: dict[str, Any]) -> Future:
        if self._stop.is_set():
            raise IPDCError("this swarm session is closed: open another with ipdc.connect()")
        task_id = str(JobId.new())
        future = Future(task_id, self._materialize, self._cancel)
        arguments = [v if isinstance(v, Future) else self._arg(v) for v in values]
        task = _Task(future, self._function(fn), arguments, kwargs, chunk, pin, resources)
        with self._lock:
            self._tasks[task_id] = task
            if any(isinstance(v, Future) and not v.done() for v in task.values):
                self._waiting.append(task)
                for value in task.values:
                    if isinstance(value, Future):
                        value.add_done_callback(lambda _: self._release())
                return future
        self._send(task)
        return future

    def _function(self, fn: Callable[..., Any]) -> Cid:
        """The CID of ``fn`` cloudpickled, added to kubo once per function object."""
        known = self._functions.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        import cloudpickle
        _by_value(fn)
        cid = self._store(cloudpickle.dumps(fn))
        self._functions[id(fn)] = (fn, cid)
        return cid

    def _store(self, data: bytes) -> Cid:
        """Add ``data`` to this node's kubo unless it is there already: the same value passed
        to many tasks is stored once."""
        cid = Cid(cid_of(data))
        if cid not in self._stored:
            added = self.kubo.add_bytes(data, "task-input")
            if added != cid:
                raise IPDCError(f"kubo named an input {added}, where IPDC computed {cid}: set the node's "
                                "kubo Import settings as `ipdc node init` does")
            self._stored.add(cid)
        return cid

    def _arg(self, value: Any) -> TaskArg:
        import cloudpickle
        codec, data = encode(value, cloudpickle.dumps)
        if len(data) <= INLINE_ARG:
            return TaskArg(codec, data=base64.b64encode(data).decode())
        return TaskArg(codec, cid=self._store(data))

    def _resolved(self, value: Any) -> TaskArg:
        """A finished future as an argument: its result by CID (or inline when small)."""
        if not isinstance(value, Future):
            assert isinstance(value, TaskArg)
            return value
        stored = value.stored()
        if stored.codec == HERE:
            return self._arg(stored.value)
        if stored.cid is not None:
            return TaskArg(stored.codec, cid=stored.cid)
        assert stored.data is not None
        return TaskArg(stored.codec, data=base64.b64encode(stored.data).decode())

    def _release(self) -> None:
        """Send the waiting tasks whose futures are all done; fail those whose one failed."""
        with self._lock:
            ready = [t for t in self._waiting if all(v.done() for v in t.values if isinstance(v, Future))]
            self._waiting = [t for t in self._waiting if t not in ready]
        for task in ready:
            failed = [v for v in task.values if isinstance(v, Future) and (v.cancelled() or v.exception(0))]
            if failed:
                upstream = failed[0]
                reason = upstream.exception(0) if not upstream.cancelled() else None
                self._settle(task, exception=TaskFailed(
                    f"task {task.future.task_id} did not run: the task {upstream.task_id} it takes as an "
                    f"argument {'was cancelled' if reason is None else f'failed: {reason}'}"))
                continue
            self._send(task)

    def _send(self, task: _Task, avoid: Iterable[str] = ()) -> None:
        """Send ``task`` to a peer (its next attempt)."""
        try:
            if task.pin is not None:
                if not self.client.peers.is_live(task.pin):
                    raise NotEnoughPeers(f"peer {task.pin} is not live: `ipdc peers` lists the live ones")
                name = task.pin
            else:
                with self._lock:
                    in_flight = dict(self._in_flight)
                name = choose(self.client.peers.live(), task.future.task_id, in_flight, task.resources,
                              avoid).name
        except NotEnoughPeers as exc:
            self._settle(task, exception=exc)
            return
        message = Task(self.session, JobId(task.future.task_id), task.attempt + 1, "run", task.fn,
                       [self._resolved(v) for v in task.values], task.kwargs, task.chunk)
        with self._lock:
            if task.future.done():
                return
            task.attempt += 1
            task.future.peers.append(name)
            self._in_flight[name] += 1
            task.re = self.client.send(TASK, name, message)
            task.sent_at = time.monotonic()

    def _cancel(self, future: Future) -> None:
        with self._lock:
            task = self._tasks.pop(future.task_id, None)
            if task is None:
                return
            if task in self._waiting:
                self._waiting.remove(task)
            elif future.peer:
                self._in_flight[future.peer] -= 1
                self.client.send(TASK, future.peer, Task(self.session, JobId(future.task_id), task.attempt,
                                                         "cancel"))

    # -- settling ------------------------------------------------------------------------
    def _run(self) -> None:
        last_watch = 0.0
        while not self._stop.is_set():
            try:
                inbound = self._replies.get(timeout=WATCH_INTERVAL)
            except queue.Empty:
                pass
            else:
                try:
                    self._reply(inbound.topic.split("/")[2], TASK_REPLY.decode(inbound.payload))
                except IPDCError as exc:
                    log.warning("dropped a task reply on %s: %s", inbound.topic, exc)
            if time.monotonic() - last_watch >= WATCH_INTERVAL:
                last_watch = time.monotonic()
                self._watch()

    def _reply(self, sender: str, reply: TaskReply) -> None:
        if reply.peer != sender or not verify(reply, TASK_REPLY.name, str(self.session)):
            raise ValueRefused(f"a reply claiming to be from {reply.peer} is not signed by {sender}'s key "
                               "for this session")
        with self._lock:
            task = self._tasks.get(str(reply.task))
            if task is None or reply.re != task.re or reply.attempt != task.attempt:
                return  # a late reply of an earlier attempt, or of a task settled meanwhile
            self._in_flight[sender] -= 1
        if reply.error:  # the task could not run there: another attempt, elsewhere
            self._retry(task, f"{sender}: {reply.error}")
            return
        self._measure(task, sender, reply)
        trusted = reply.submitter == self.signer.public_key or reply.submitter in self.trust
        stored = Stored(reply.codec, base64.b64decode(reply.data) if reply.cid is None else None, reply.cid,
                        trusted, sender)
        if reply.ok:
            self._settle(task, stored=stored)
            return
        self._settle(task, exception=self._remote_exception(stored, sender, reply.traceback))

    def _remote_exception(self, stored: Stored, peer: str, trace: str) -> BaseException:
        """What user code raised on ``peer``: the exception itself (when its pickle may be
        trusted), with the worker's traceback and peer as a note; else TaskFailed."""
        where = f"raised on peer {peer}; the worker's traceback:\n{trace}"
        try:
            value = self._materialize(stored)
        except ValueRefused as exc:
            return TaskFailed(f"the task failed on {peer}, and its exception was refused: {exc}\n{where}",
                              peer=peer, remote_traceback=trace)
        if isinstance(value, BaseException):
            value.add_note(where)
            return value
        return TaskFailed(f"{value}\n{where}", peer=peer, remote_traceback=trace)

    def _retry(self, task: _Task, why: str) -> None:
        task.failures.append(why)
        if task.pin is not None or len(task.failures) >= self.max_attempts:
            tried = ", ".join(task.future.peers)
            self._settle(task, exception=TaskFailed(
                f"task {task.future.task_id} failed {len(task.failures)} time(s), on {tried}; the last "
                f"failure: {why}", peer=task.future.peer))
            return
        log.warning("task %s: %s; running it again elsewhere", task.future.task_id, why)
        self._send(task, avoid=task.future.peers)

    def _watch(self) -> None:
        """Send the tasks of a worker that left to another peer."""
        with self._lock:
            running = [t for t in self._tasks.values() if t.attempt >= 0 and t.future.peer]
        gone = {t.future.peer for t in running if not self.client.peers.is_live(t.future.peer)}
        for task in running:
            if task.future.peer in gone:
                with self._lock:
                    self._in_flight[task.future.peer] -= 1
                self._retry(task, f"{task.future.peer} left the swarm while running it")

    def _settle(self, task: _Task, *, stored: Stored | None = None,
                exception: BaseException | None = None) -> None:
        with self._lock:
            if self._tasks.pop(task.future.task_id, None) is None:
                return
        if task.future.done():
            return
        if exception is not None:
            task.future.set_exception(exception)
        else:
            task.future.set_result(stored)

    def _measure(self, task: _Task, peer: str, reply: TaskReply) -> None:
        """What offload's cost model learns from a reply: the function's run time and result
        size, and the round-trip overhead of a task to ``peer``."""
        if task.chunk:
            return
        with self._lock:
            self._runs.setdefault(task.fn, Measured()).add(reply.seconds)
            self._result_sizes.setdefault(task.fn, Measured()).add(reply.size)
            overhead = time.monotonic() - task.sent_at - reply.seconds
            if peer in self._bound:
                self._rtts.setdefault(peer, Measured()).add(max(0.0, overhead))
            else:  # the session's first task there also bound it a runner: a one-off, not a round trip
                self._bound.add(peer)

    def _materialize(self, stored: Stored) -> Any:
        """The value of a task's result: fetched by CID when it is not inline, then decoded
        (a pickle only from a trusted worker)."""
        if stored.codec == HERE:
            return stored.value
        if stored.data is not None:
            data = stored.data
        else:
            t0 = time.monotonic()
            data = self.kubo.fetch_checked(str(stored.cid), stall=self.config.sandbox.fetch_stall)
            with self._lock:
                rate = len(data) / max(1e-6, time.monotonic() - t0)
                self._bandwidths.setdefault(stored.peer, Measured()).add(rate)
        if stored.codec == "pickle" and not stored.trusted:
            raise ValueRefused("a pickled result came from a worker whose node key is not trusted here, and "
                               "unpickling runs code: return plain data (msgpack types, numpy arrays), or "
                               "trust that node's key with `ipdc trust add KEY`")
        return decode(stored.codec, data, allow_pickle=True)


def _by_value(fn: Callable[..., Any]) -> None:
    """Have cloudpickle carry ``fn``'s module by value when it is the user's own code.

    cloudpickle pickles a function of an importable module by reference (its name), which
    a worker can resolve only when it has the same file: the standard library and
    installed packages, yes; the user's script or test module, no. So functions travel by
    value unless their module is installed.
    """
    import cloudpickle
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or file is None:
        return
    installed = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    if not any(Path(file).resolve().is_relative_to(Path(p).resolve()) for p in installed if p):
        cloudpickle.register_pickle_by_value(module)


def node_running(home: Path) -> bool:
    """Whether a node runs for ``home`` (its controller service answers)."""
    from ipdc.ctlsock import ControlClient
    try:
        ControlClient(home, timeout=5).call("ping")
    except ControlError:
        return False
    return True


def connect(home: Path | str | None = None, *, nodes: int = 2, max_attempts: int = 3) -> Swarm:
    """A session on the swarm of the node in ``home`` (``$IPDC_HOME``, or ``~/.ipdc``); with no
    node running there, on a temporary local cluster of ``nodes`` nodes, stopped and removed
    when the session closes (as ``ipdc mr`` does)."""
    where = Path(home) if home is not None else ipdc_home()
    if node_running(where):
        return Swarm(where, max_attempts=max_attempts)
    from ipdc.node.cluster import LocalCluster
    log.warning("no IPDC node is running for %s: starting a temporary local cluster of %d nodes",
                where, nodes)
    cluster = LocalCluster(nodes).start()
    try:
        return Swarm(cluster.nodes[0].home, max_attempts=max_attempts, on_close=cluster.close)
    except BaseException:
        cluster.close()
        raise
