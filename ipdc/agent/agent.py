"""The IPDC agent: one per node, the worker side of every job.

Lifecycle (``python -m ipdc.agent``, started by ``deploy.py start``), read top to
bottom in :meth:`Agent.run`:

1. connect to the broker with a persistent session and a last will that clears
   the node's retained presence; announce presence on every (re)connect;
2. subscribe to the node's inbox ``ipdc/peer/<name>/+``; decode, authenticate and
   route each message; heartbeat every ``agent.heartbeat_interval`` seconds and
   drop jobs whose submitter has been silent for ``agent.job_lease``;
3. on SIGTERM: clear presence, kill the runners, disconnect.

The paho network thread only queues messages. The dispatcher thread decodes them,
checks who sent them, and hands them to the job table (:mod:`ipdc.agent.jobs`),
which decides; this shell carries out its actions: code fetches on a small I/O
pool, tasks on a pool of ``node.slots`` threads that each drive one runner
(:mod:`ipdc.agent.execute`). User code never runs here: it runs in sandboxes
(:mod:`ipdc.spawn`), and the agent itself is not dumpable, so no process of its uid
can trace it or read its memory, environment or open files.

Only signed jobs run (see ipdc.trust). A message must be signed by a trusted key,
for this node and this channel; a Download must also be fresh, carry an unseen
nonce and list this node among its workers. A message that fails any check is
logged with the reason and never answered: an answer would let any member make a
worker speak, and a submitter replaces a worker that does not accept its job.
"""

from __future__ import annotations

import sys

# The agent never uses trio, but httpcore imports it whenever it is installed: 3 MB in
# every agent. (Not done in the runner: user code may want trio.)
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from ipdc import __version__  # noqa: E402
from ipdc.agent.execute import Executor  # noqa: E402
from ipdc.agent.joblogs import JobLogs  # noqa: E402
from ipdc.agent.jobs import (  # noqa: E402
    Action,
    Drop,
    Fetch,
    JobKey,
    JobTable,
    Note,
    Prepare,
    Report,
    RunMap,
    RunReduce,
    Unpin,
    key_of,
)
from ipdc.agent.membership import Membership, check_identity  # noqa: E402
from ipdc.agent.pytasks import TaskService  # noqa: E402
from ipdc.bus import Bus, Inbound, Will  # noqa: E402
from ipdc.errors import IPDCError, MessageError, TaskFailed  # noqa: E402
from ipdc.home import NodeHome, RenewedJobs, SubmittedJobs  # noqa: E402
from ipdc.spawn import Sandbox, make_undumpable  # noqa: E402
from ipdc.trust import digest, signer_of, verify  # noqa: E402
from ipdc.wire.buffer import Buffer  # noqa: E402
from ipdc.wire.cleanup import CleanUp  # noqa: E402
from ipdc.wire.domap import DoMap  # noqa: E402
from ipdc.wire.download import Download  # noqa: E402
from ipdc.wire.getresult import GETRESULT, GetResult  # noqa: E402
from ipdc.wire.heartbeat import HEARTBEAT, Heartbeat  # noqa: E402
from ipdc.wire.ids import JobId, NodeName  # noqa: E402
from ipdc.wire.inbox import INBOX_CHANNELS  # noqa: E402
from ipdc.wire.inline import InlineMismatch, threshold, unpack  # noqa: E402
from ipdc.wire.logs import LOGS_REPLY, Logs  # noqa: E402
from ipdc.wire.manifest import SAFE_NAME, JobManifest  # noqa: E402
from ipdc.wire.presence import PRESENCE, Capabilities, Presence  # noqa: E402
from ipdc.wire.renew import RENEW, Renew  # noqa: E402
from ipdc.wire.stages import stages_of  # noqa: E402
from ipdc.wire.task import Task  # noqa: E402
from ipdc.wire.tf import Tf, TfPlan, socket_root  # noqa: E402

if TYPE_CHECKING:
    from ipdc.agent.tfhost import TfHost

log = logging.getLogger("ipdc.agent")


def capabilities(tf_setting: str) -> Capabilities:
    mem_free = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                mem_free = int(line.split()[1]) // 1024
    except OSError:
        pass
    tf = tf_setting == "yes" or (tf_setting == "auto" and importlib.util.find_spec("tensorflow") is not None)
    return Capabilities(cores=os.cpu_count() or 1, mem_free_mb=mem_free, tf=tf)


def job_dir_name(key: JobKey) -> str:
    """A job's work dir: its id, prefixed by its submitter's key, so two submitters' jobs
    never share a directory even with the same id."""
    return f"{hashlib.sha256(key[0].encode()).hexdigest()[:8]}-{key[1]}"


class Agent:
    """The worker of one node."""

    def __init__(self, node: NodeHome) -> None:
        self.node = node
        self.config = cfg = node.config
        self.name = cfg.node.name
        self.kubo = node.kubo(timeout=600)
        self.table = JobTable(self.name)
        self.trust = node.trust
        self.nonces = node.nonces()
        self.submitted = SubmittedJobs(node.home)
        self.renewed = RenewedJobs(node.home)
        self.running = 0
        self.peer_id = ""
        self._lock = threading.Lock()
        """Guards the job table: the dispatcher and the task threads both use it."""
        self._stop = threading.Event()
        self.tasks = ThreadPoolExecutor(cfg.slots, thread_name_prefix="task")
        self.io = ThreadPoolExecutor(4, thread_name_prefix="io")
        self.fetchers = ThreadPoolExecutor(4, thread_name_prefix="fetch")
        """A job's code files are fetched at once, each from wherever the swarm has it."""
        self.sandbox = Sandbox.open_shared(node.home / "logs")
        self.executor = Executor(cfg.sandbox, self.sandbox, self.kubo, cfg.agent.warm_runners)
        self._tf: TfHost | None = None
        self.logs = JobLogs(self.name, node.home / "logs", self.kubo, self.io,
                            lambda r: self.bus.publish(LOGS_REPLY.topic(node=self.name, job=r.job_id),
                                                       LOGS_REPLY.encode(r)))
        self.presence_topic = PRESENCE.topic(node=self.name)
        self.bus = Bus(cfg.broker, f"{self.name}.agent", session_expiry=3600,
                       will=Will(self.presence_topic), on_connected=self.announce)
        self.membership = Membership(node, self.bus, self.announce, self.stop)
        self.pytasks = TaskService(self.name, node.signer, self.executor, self.tasks, self.bus.publish,
                                   self._busy)
        self.stopped_because = ""
        """Why the agent stopped by itself (removed, revoked, identity taken); "" otherwise."""

    # -- lifecycle -------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self.peer_id = self.kubo.id()["ID"]
        check_identity(self.node)
        if socket_root(self.node.home).exists():
            from ipdc.agent.tfhost import sweep
            sweep(self.node.home, self.kubo)
        self.bus.subscribe(f"ipdc/peer/{self.name}/+", *self.membership.topics())
        self.bus.connect(timeout=30)
        log.info("agent %s (peer %s) serving %d slots", self.name, self.peer_id, self.config.slots)
        threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat").start()
        while not self._stop.is_set():
            if self.bus.failure is not None:
                self.stop(str(self.bus.failure))
                break
            try:
                message = self.bus.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.dispatch(message)
        self.shutdown()

    def stop(self, why: str) -> None:
        """Stop for a reason of the swarm's (see :mod:`ipdc.agent.membership`), saying why."""
        log.error("agent %s stops: %s", self.name, why)
        self.stopped_because = why
        self._stop.set()

    def shutdown(self) -> None:
        log.info("agent %s stopping", self.name)
        if self.bus.failure is None:
            self.bus.publish(self.presence_topic, b"", retain=True)
            self.bus.publish(HEARTBEAT.topic(node=self.name), b"", retain=True)
        self.executor.close()
        if self._tf is not None:
            self._tf.close()  # its kubo listeners and forwards outlive its sandboxes
        self.sandbox.close()
        self.tasks.shutdown(wait=False, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.fetchers.shutdown(wait=False, cancel_futures=True)
        self.bus.close()

    def announce(self) -> None:
        cfg = self.config
        presence = Presence(
            name=NodeName(self.name), peer_id=self.peer_id, host=cfg.node.host,
            addrs=[self.node.swarm_multiaddr()], caps=capabilities(cfg.node.tf), slots=cfg.slots,
            load=_load(), ts=time.time(), version=__version__, lease=cfg.agent.job_lease,
            instance=self.node.instance, extra=self.membership.presence_extra(),
        )
        self.bus.publish(self.presence_topic, PRESENCE.encode(presence), retain=True)

    def _heartbeat(self) -> None:
        """Beat, drop jobs past their lease, and every few beats redial lost bootstrap peers
        (after a partition heals)."""
        topic = HEARTBEAT.topic(node=self.name)
        beats = 0
        while not self._stop.wait(self.config.agent.heartbeat_interval):
            beat = Heartbeat(name=NodeName(self.name), ts=time.time(), load=_load(), running=self.running)
            try:
                self.bus.publish(topic, HEARTBEAT.encode(beat), retain=True)
            except Exception:  # a node that stops beating is taken for dead
                log.exception("heartbeat failed; trying again in %g s", self.config.agent.heartbeat_interval)
            with self._lock:
                expired = self.table.expire(time.time(), self.config.agent.job_lease)
            self.perform(expired)
            self.pytasks.expire(time.time(), self.config.agent.job_lease)
            for job_id, cids in self.submitted.orphans():
                self._unpin(tuple(cids), f"the uploads of job {job_id}")
                self.submitted.forget(job_id)
                log.info("unpinned the input and code of job %s: its submitter on this node is gone", job_id)
            beats += 1
            if beats % 5 == 0:
                self._renew_owned()
                try:
                    self.node.connect_swarm(self.kubo)
                except IPDCError as exc:
                    log.warning("swarm check failed: %s", exc)

    def _renew_owned(self) -> None:
        """Renew the jobs this node owns beyond their command (TF clusters) with their peers."""
        renewals = self.renewed.entries()
        if not renewals:
            return
        signer = self.node.signer
        for job_id, peers in renewals:
            for peer in peers:
                self.bus.publish(RENEW.topic(node=peer), RENEW.encode(signer.sign(Renew(JobId(job_id)),
                                                                                   RENEW.name, peer)))

    # -- dispatch --------------------------------------------------------------------
    def dispatch(self, message: Inbound) -> None:
        """Decode, authenticate and route one message; nothing it holds can stop the agent."""
        if self.membership.handles(message.topic):
            self.membership.handle(message)
            return
        channel_name = message.topic.rsplit("/", 1)[-1]
        channel = INBOX_CHANNELS.get(channel_name)
        if channel is None:
            log.warning("dropped a message on unknown topic %s", message.topic)
            return
        try:
            msg = channel.decode(message.payload)
            refused = self._authentic(msg, channel_name)
            if refused:
                log.warning("rejected %s: %s", _describe(msg), refused)
                return
            job = self._take_inline(msg)
            self.route(msg)
            if job is not None and job not in self.table.jobs:  # refused or finished: nothing will use them
                self.executor.received.drop(job_dir_name(job))
        except InlineMismatch as exc:
            log.warning("refused a message on %s: %s", message.topic, exc)
        except MessageError as exc:
            log.warning("dropped a malformed message on %s: %s", message.topic, exc)
        except Exception:  # one bad message must never stop the agent
            log.exception("handler for %s failed", message.topic)

    def _authentic(self, msg: Any, channel: str) -> str:
        """Why ``msg`` is refused ("" when it is not): it must be signed, by a trusted key, for
        this node on this channel."""
        key = signer_of(msg)
        if not msg.sig:
            return "it is unsigned"
        if refused := self.membership.refusal(key):
            return refused
        if key not in self.trust:
            return (f"its submitter key is not trusted here: to run its jobs on {self.name}, run "
                    f"`ipdc trust add {key}` there")
        if not verify(msg, channel, self.name):
            return ("its signature does not match its content, this node or this channel (forged, "
                    "tampered, or replayed from another node)")
        return ""

    def _take_inline(self, msg: Any) -> JobKey | None:
        """Check the payloads a message carries inline against their CIDs and keep them for its
        job (see :mod:`ipdc.agent.inline`); the job's key, or None when it carries none.

        Bytes that do not match their CID refuse the whole message (InlineMismatch, logged by
        :meth:`dispatch`), before anything of it is acted on."""
        inline = getattr(msg, "inline", None)
        if not inline:
            return None
        job_id = msg.manifest.job_id if isinstance(msg, Download) else msg.job_id
        sender = f"submitter {signer_of(msg)} in {_describe(msg)}"
        key = (signer_of(msg), str(job_id))
        self.executor.received.put(job_dir_name(key), unpack(inline, sender))
        return key

    def route(self, msg: Any) -> None:
        now = time.time()
        re = digest(msg)
        if isinstance(msg, Task):  # a Python API task: fresh and unseen, like a manifest
            refused = self.nonces.check(msg.nonce, msg.submitted_at)
            if refused:
                log.warning("rejected %s: %s", _describe(msg), refused)
            else:
                self.pytasks.handle(msg, re)
            return
        with self._lock:
            if isinstance(msg, Download):
                actions = self._download(msg.manifest, re, now)
            elif isinstance(msg, DoMap):
                actions = self.table.domap((msg.submitter, msg.job_id), msg.task, msg.attempt, re, now)
            elif isinstance(msg, Buffer):
                actions = self.table.buffer((msg.submitter, msg.job_id), msg.partition, msg.task, msg.cid,
                                            msg.attempt, re, now)
            elif isinstance(msg, Renew):
                actions = self.table.renew((msg.submitter, msg.job_id), now)
            elif isinstance(msg, CleanUp):
                actions = self.table.cleanup((msg.submitter, msg.job_id))
            elif isinstance(msg, Logs):
                refused = self.logs.request(msg, re, [*self.table.jobs, *self.table.finished])
                actions = [Note(refused)] if refused else []
            else:
                actions = self._tf_request(msg, re, now)
        self.perform(actions)

    def _download(self, manifest: JobManifest, re: str, now: float) -> list[Action]:
        what = f"download of job {manifest.job_id}"
        for name in manifest.code:
            if not SAFE_NAME.fullmatch(name):
                raise MessageError(f"download: unsafe file name {name!r} in job {manifest.job_id}")
        if manifest.kind == "mapreduce" and (not manifest.chunks or not manifest.partitions):
            raise MessageError(f"download: job {manifest.job_id} has no chunks or no reducers")
        if manifest.kind == "mapreduce":
            stages_of(manifest.params.get("stages"), set(manifest.code))  # MessageError when malformed
        if manifest.kind == "tf" and (manifest.code or set(manifest.workers) != set(
                TfPlan.from_params(manifest.params).peers)):
            raise MessageError(f"download: TF cluster {manifest.job_id} carries code, or its workers "
                               "are not its plan's hosts")
        if manifest.kind == "mapreduce":
            threshold(manifest.params)  # a bad one is a malformed manifest
        if self.name not in manifest.workers:
            return [Note(f"rejected {what}: this node is not among the job's workers (a manifest "
                         "replayed from another node?)")]
        key = key_of(manifest)
        if key not in self.table.jobs:  # a repeat needs no fresh nonce; a job that ended here answers fresh ones only
            refused = self.nonces.check(manifest.nonce, manifest.submitted_at)
            if refused:
                return [Note(f"rejected {what}: {refused}")]
        return self.table.download(manifest, re, now)

    def _tf_request(self, msg: Tf, re: str, now: float) -> list[Action]:
        """Tf ops are served by the TF host (:mod:`ipdc.agent.tfhost`), for a held cluster only,
        from the plan its Download carried. The TF host reports on its own; its answers echo ``re``."""
        key = (msg.submitter, str(msg.cluster_id))
        job = self.table.jobs.get(key)
        if job is None or job.manifest.kind != "tf":
            return [Note(f"refused tf {msg.op} of cluster {msg.cluster_id}: the cluster is unknown here")]
        job.last_heard = now
        self.io.submit(self.tf_host().handle, msg.op, key, TfPlan.from_params(job.manifest.params), re)
        return []

    def tf_host(self) -> TfHost:
        """Made on the first TF request: most agents never host TF."""
        if self._tf is None:
            from ipdc.agent.tfhost import TfHost
            cfg = self.config
            self._tf = TfHost(self.name, self.node.home, self.kubo, self.sandbox, self.peer_id,
                              capabilities(cfg.node.tf).tf, cfg.tf.trusted_network, self.report)
        return self._tf

    # -- actions ---------------------------------------------------------------------
    def perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Report):
                self.report(action.result)
            elif isinstance(action, Note):
                log.warning("%s", action.text)
            elif isinstance(action, Fetch):
                self.io.submit(self._fetch, action)
            elif isinstance(action, Prepare):
                self.io.submit(self._prepare, action.key)
            elif isinstance(action, (RunMap, RunReduce)):
                self.tasks.submit(self._run, action)
            elif isinstance(action, Drop):
                self.io.submit(self._drop, action)
            elif isinstance(action, Unpin):
                self.io.submit(self._unpin, action.cids, "late output of a dropped job")

    def report(self, result: GetResult) -> None:
        self.bus.publish(GETRESULT.topic(node=self.name, job=result.job_id), GETRESULT.encode(result))

    def _dir(self, key: JobKey) -> Path:
        return self.node.work_dir / job_dir_name(key)

    def _fetch(self, action: Fetch) -> None:
        job_dir = self._dir(action.key)
        error = ""
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            job = job_dir_name(action.key)
            contents = self.fetchers.map(lambda cid: self.executor.fetch(job, cid),
                                         action.manifest.code.values())
            for name, data in zip(action.manifest.code, contents, strict=True):
                (job_dir / name).write_bytes(data)
        except Exception as exc:  # whatever it was, the submitter must hear of it
            if not isinstance(exc, (IPDCError, OSError)):
                log.exception("download of job %s failed", action.key[1])
            error = f"download of the job's code failed on {self.name}: {exc}"
        else:
            log.info("job %s: code fetched into %s, ready", action.key[1], job_dir)
        with self._lock:
            actions = self.table.fetched(action.key, error, time.time())
        self.perform(actions)

    def _prepare(self, key: JobKey) -> None:
        """Bind a runner now; a failure here is left for the task to meet."""
        job = self.table.jobs.get(key)
        if job is None:
            return
        try:
            self.executor.prepare(job_dir_name(key), job.manifest, self._dir(key))
        except TaskFailed as exc:
            log.info("could not prepare a runner for job %s yet: %s", key[1], exc)

    def _run(self, action: RunMap | RunReduce) -> None:
        """Run one task in a runner, and report its outputs or its failure."""
        key = action.key
        kind, task = ("map", action.task) if isinstance(action, RunMap) else ("reduce", action.partition)
        job = self.table.jobs.get(key)
        if job is None:
            return
        self._busy(1)
        try:
            if isinstance(action, RunMap):
                cids, stats, inline = self.executor.run_map(job_dir_name(key), job.manifest, self._dir(key),
                                                            action.chunk, job.manifest.source(action.task))
            else:
                cids, stats, inline = self.executor.run_reduce(job_dir_name(key), job.manifest,
                                                               self._dir(key), action.inputs)
        except Exception as exc:  # a task that fails in any way is reported, never lost
            trace = exc.remote_traceback if isinstance(exc, TaskFailed) else ""
            if not isinstance(exc, IPDCError):
                log.exception("%s task %d of job %s broke the runner protocol", kind, task, key[1])
            log.warning("%s task %d of job %s failed: %s", kind, task, key[1], exc)
            with self._lock:
                actions = self.table.task_failed(key, kind, task, action.attempt,
                                                 f"{kind} task {task} failed on {self.name}: {exc}\n{trace}",
                                                 action.re)
        else:
            log.info("job %s: %s task %d attempt %d done (%d output(s))", key[1], kind, task, action.attempt,
                     len(cids))
            with self._lock:
                actions = self.table.task_done(key, kind, task, action.attempt, cids, stats, action.re)
            if any(isinstance(a, Unpin) for a in actions):
                self.executor.produced.settle(job_dir_name(key))  # in kubo before it is unpinned
            actions = [Report(replace(a.result, inline=inline)) if isinstance(a, Report) else a
                       for a in actions]
        finally:
            self._busy(-1)
        self.perform(actions)

    def _busy(self, change: int) -> None:
        """A task started (+1) or ended (-1): the heartbeat's ``running`` counts it."""
        with self._lock:
            self.running += change

    def _drop(self, action: Drop) -> None:
        self.executor.drop(job_dir_name(action.key))
        if self._tf is not None:
            self._tf.stop(action.key)
        shutil.rmtree(self._dir(action.key), ignore_errors=True)
        self._unpin(action.created, f"the files of job {action.key[1]}")
        log.info("dropped job %s: %s", action.key[1], action.why)

    def _unpin(self, cids: tuple[Any, ...], what: str) -> None:
        try:
            self.kubo.pin_rm(*cids)
        except IPDCError as exc:
            log.warning("could not unpin %s: %s", what, exc)


def _describe(msg: Any) -> str:
    """How a refused message is named in the log."""
    if isinstance(msg, Download):
        return f"download of job {msg.manifest.job_id}"
    if isinstance(msg, DoMap):
        return f"domap {msg.task} (attempt {msg.attempt}) of job {msg.job_id}"
    if isinstance(msg, Buffer):
        return f"buffer {msg.task}->{msg.partition} (attempt {msg.attempt}) of job {msg.job_id}"
    if isinstance(msg, Tf):
        return f"tf {msg.op} of cluster {msg.cluster_id}"
    if isinstance(msg, Task):
        return f"task {msg.task} ({msg.op}, attempt {msg.attempt}) of API session {msg.session}"
    return f"{type(msg).__name__.lower()} of job {JobId(msg.job_id)}"


def _load() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def main() -> None:
    make_undumpable()
    node = NodeHome()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        agent = Agent(node)
        agent.run()
    except IPDCError as exc:  # refused to start: say why in agent.log, which `deploy.py start` shows
        log.error("agent refuses to start: %s", exc)
        sys.exit(exc.exit_code)
    if agent.stopped_because:
        sys.exit(1)
