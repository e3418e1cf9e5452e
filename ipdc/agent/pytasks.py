"""The agent's side of the Python API (:mod:`ipdc.api`): run one task, answer it signed.

A Task reaches here authenticated (signed by a trusted submitter for this node,
fresh, its nonce unseen: see :meth:`ipdc.agent.agent.Agent.dispatch`). Its function
and large arguments are fetched by CID, checked against it, and kept in a small
cache, so an array passed to a thousand tasks is fetched once per node, and tasks
that fetch it at the same moment wait for the one fetch. The call runs in a runner
bound to the submitting session (the same sandboxed runners as Map.py), never here.

The answer carries the result inline when it is small, else its CID (added to this
node's kubo and pinned until the session closes, so a dependent task on another
node fetches it worker to worker). It is signed with this node's key: the submitter
unpickles a value only from a node key it trusts.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ipdc.agent.execute import Executor
from ipdc.agent.sandbox import Runner
from ipdc.errors import IPDCError, TaskFailed
from ipdc.trust import Signer
from ipdc.wire import fdmsg
from ipdc.wire.getresult import MAX_ERROR, clip
from ipdc.wire.ids import Cid, NodeName
from ipdc.wire.task import TASK_REPLY, Task, TaskReply

log = logging.getLogger(__name__)

#: Results up to this size travel inline in the reply (base64 grows them by a third).
INLINE_RESULT = 256 << 10
#: Bytes of functions and arguments kept per node, most recently used first.
CACHE_BYTES = 1 << 30

TaskKey = tuple[str, str, str]
"""(submitter key, session, task)."""


class InputCache:
    """Functions and arguments by CID: fetched once, shared by every task of the node."""

    def __init__(self, fetch: Callable[[str], bytes], limit: int = CACHE_BYTES) -> None:
        self._fetch = fetch
        self._limit = limit
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._pending: dict[str, Future[bytes]] = {}
        self._lock = threading.Lock()

    def get(self, cid: str) -> bytes:
        with self._lock:
            if cid in self._data:
                self._data.move_to_end(cid)
                return self._data[cid]
            pending = self._pending.get(cid)
            mine = pending is None
            if pending is None:
                pending = self._pending[cid] = Future()
        if not mine:
            return pending.result()
        try:
            data = self._fetch(cid)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._pending[cid]
        log.info("task input %s fetched (%d bytes)", cid, len(data))
        with self._lock:
            self._data[cid] = data
            self._size += len(data)
            while self._size > self._limit and len(self._data) > 1:
                self._size -= len(self._data.popitem(last=False)[1])
        pending.set_result(data)
        return data


@dataclass
class Session:
    """One submitting :class:`ipdc.api.Swarm` as this node sees it."""

    tag: str
    """Its runners' job name in the runner pool."""
    last_heard: float
    pinned: list[Cid] = field(default_factory=list)
    running: dict[str, Runner] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)


class TaskService:
    """Runs the Python API tasks this node is sent, on the agent's task threads."""

    def __init__(self, name: str, signer: Signer, executor: Executor, threads: ThreadPoolExecutor,
                 publish: Callable[[str, bytes], None], busy: Callable[[int], None]) -> None:
        self.name = name
        self.signer = signer
        self.executor = executor
        self.kubo = executor.kubo
        self.threads = threads
        self.publish = publish
        self.busy = busy
        self.inputs = InputCache(executor.fetch_swarm)
        self.sessions: dict[tuple[str, str], Session] = {}
        self._made = 0
        """Sessions made so far: a session that comes back after it expired gets fresh runners
        (the pool refuses a dropped name for good)."""
        self._lock = threading.Lock()

    def handle(self, msg: Task, re: str) -> None:
        """An authenticated Task: queue it, or cancel one (on the dispatcher thread)."""
        key = (msg.submitter, str(msg.session))
        with self._lock:
            session = self.sessions.get(key)
            if session is None:
                self._made += 1
                who = hashlib.sha256(msg.submitter.encode()).hexdigest()[:8]
                tag = f"api-{who}-{msg.session}-{self._made}"
                session = self.sessions[key] = Session(tag, time.time())
            session.last_heard = time.time()
            if msg.op == "cancel":
                session.cancelled.add(str(msg.task))
                runner = session.running.get(str(msg.task))
                if runner is not None:
                    runner.kill()
                log.info("task %s of session %s cancelled", msg.task, msg.session)
                return
        self.threads.submit(self._run, session, msg, re)

    def expire(self, now: float, lease: float) -> None:
        """Drop the sessions silent for ``lease`` seconds: their runners and pins."""
        with self._lock:
            gone = [k for k, s in self.sessions.items() if now - s.last_heard > lease and not s.running]
            dropped = [self.sessions.pop(k) for k in gone]
        for session in dropped:
            self.executor.drop(session.tag)
            if session.pinned:
                try:
                    self.kubo.pin_rm(*session.pinned)
                except IPDCError as exc:
                    log.warning("could not unpin the results of %s: %s", session.tag, exc)
            log.info("dropped API session %s: silent for %g s", session.tag, lease)

    def _run(self, session: Session, msg: Task, re: str) -> None:
        task = str(msg.task)
        with self._lock:
            if task in session.cancelled:
                return
        self.busy(1)
        log.info("task %s (attempt %d) of API session %s started", task, msg.attempt, msg.session)
        try:
            reply = self._call(session, msg)
        except Exception as exc:  # the submitter must hear why, whatever it was
            if not isinstance(exc, IPDCError):
                log.exception("task %s of session %s broke the runner protocol", task, msg.session)
            with self._lock:
                cancelled = task in session.cancelled
            error = "cancelled" if cancelled else f"the task could not run on {self.name}: {exc}"
            reply = TaskReply(msg.session, msg.task, msg.attempt, NodeName(self.name), ok=False,
                              error=clip(error))
        finally:
            with self._lock:
                session.running.pop(task, None)
            self.busy(-1)
        reply = self.signer.sign(replace(reply, re=re), TASK_REPLY.name, str(msg.session))
        self.publish(TASK_REPLY.topic(node=self.name, job=msg.session), TASK_REPLY.encode(reply))

    def _call(self, session: Session, msg: Task) -> TaskReply:
        assert msg.fn is not None
        documents = [self.inputs.get(msg.fn)]
        for arg in msg.args:
            documents.append(self.inputs.get(arg.cid) if arg.cid is not None else base64.b64decode(arg.data))
        request = {"op": "task", "sizes": [len(d) for d in documents], "codecs": [a.codec for a in msg.args],
                   "kwargs": list(msg.kwargs), "chunk": msg.chunk}
        memfd = fdmsg.sealed_memfd(documents, "ipdc-task")
        runner = self.executor.pool.acquire(session.tag, {}, 0)
        with self._lock:
            session.running[str(msg.task)] = runner
            cancelled = str(msg.task) in session.cancelled
        if cancelled:
            runner.kill()
        try:
            reply, fds = runner.call(request, [memfd], timeout=self.executor.settings.task_timeout)
            (data,) = self.executor.outputs(reply, fds, 1)
        except TaskFailed:
            runner.kill()
            raise
        finally:
            fdmsg.close_all([memfd])
            self.executor.pool.release(runner)
        stats = reply.get("stats") or {}
        answer = TaskReply(msg.session, msg.task, msg.attempt, NodeName(self.name),
                           ok=not reply.get("raised"),
                           codec=str(reply.get("codec")), size=len(data),
                           traceback=clip(str(reply.get("traceback", "")), 4 * MAX_ERROR),
                           seconds=float(stats.get("run", 0.0)))
        if len(data) <= INLINE_RESULT:
            return replace(answer, data=base64.b64encode(data).decode())
        cid = self.kubo.add_bytes(data, "result")
        with self._lock:
            session.pinned.append(cid)
        return replace(answer, cid=cid)
