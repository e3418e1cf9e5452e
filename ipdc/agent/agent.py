"""The IPDC agent: one per node, the worker side of every job.

Lifecycle (``python -m ipdc.agent``, started by ``deploy.py start``):

1. connect to the broker with a persistent session and a last will that clears
   the node's retained presence; announce presence on every (re)connect;
2. subscribe to the node's inbox ``ipdc/peer/<name>/+`` and dispatch each message
   by channel; heartbeat every ``agent.heartbeat_interval`` seconds;
3. on SIGTERM: clear presence, kill the runners, disconnect.

The paho network thread only queues messages. A dispatcher thread decodes and
routes them; Download and CleanUp run on a small I/O pool, map and reduce tasks on
a pool of ``node.slots`` threads that each drive one runner process. A malformed
message is logged and dropped. Every handler is idempotent, because QoS 1 may
deliver a message twice.

Only signed jobs run (see ipdc.trust): a Download must be signed by a trusted
submitter, fresh, and carry an unseen nonce; every later message of the job must
be signed by the same key. Anything else is rejected with a log line that says
why, before any file is written or process started.

Tasks are keyed by attempt. The job's owner decides which attempt counts: the
agent runs what it is sent and reports ``(task, attempt)``, answering a repeated
request from what it already computed.
"""

from __future__ import annotations

import sys

# The agent never uses trio, but httpcore imports it whenever it is installed: 3 MB in
# every agent. (Not done in the runner: user code may want trio.)
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]

import importlib.util  # noqa: E402
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipdc import __version__
from ipdc.agent.sandbox import RunnerPool
from ipdc.bus import Bus, Inbound, Will
from ipdc.errors import IPDCError, MessageError, TaskFailed
from ipdc.home import NodeHome
from ipdc.kubo import KuboClient
from ipdc.trust import signer_of, verify
from ipdc.wire import INBOX_CHANNELS
from ipdc.wire.buffer import Buffer
from ipdc.wire.channel import Channel
from ipdc.wire.cleanup import CleanUp
from ipdc.wire.domap import DoMap
from ipdc.wire.download import Download
from ipdc.wire.getresult import GETRESULT, GetResult
from ipdc.wire.heartbeat import HEARTBEAT, Heartbeat
from ipdc.wire.ids import Cid
from ipdc.wire.manifest import JobManifest
from ipdc.wire.presence import PRESENCE, Capabilities, Presence
from ipdc.wire.tf import Tf

if TYPE_CHECKING:
    from ipdc.agent.tfhost import TfHost

log = logging.getLogger("ipdc.agent")

#: File names a manifest may give code files: no directories, no dot files.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: How many finished job ids are remembered, so late duplicates are recognised.
REMEMBERED_JOBS = 4096


@dataclass
class AgentJob:
    """What this agent knows and holds of one job."""

    manifest: JobManifest
    dir: Path
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
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bind_request(self, kubo_url: str) -> dict[str, Any]:
        code = self.manifest.code
        return {
            "dir": str(self.dir), "kubo": kubo_url, "partitions": self.manifest.partitions,
            "map": str(self.dir / "Map.py") if "Map.py" in code else "",
            "reduce": str(self.dir / "Reduce.py") if "Reduce.py" in code else "",
        }


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


class Agent:
    """The worker of one node."""

    def __init__(self, node: NodeHome) -> None:
        self.node = node
        self.config = cfg = node.config
        self.name = cfg.node.name
        self.kubo = KuboClient(cfg.kubo_api_url, timeout=600)
        self.jobs: dict[str, AgentJob] = {}
        self.downloading: dict[str, str] = {}
        """Jobs whose code is being fetched -> their submitter's key."""
        self.trust = node.trust
        self.nonces = node.nonces()
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.running = 0
        self.peer_id = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.tasks = ThreadPoolExecutor(cfg.slots, thread_name_prefix="task")
        self.io = ThreadPoolExecutor(4, thread_name_prefix="io")
        self.fetchers = ThreadPoolExecutor(4, thread_name_prefix="fetch")
        """A job's code files are fetched at once, each from wherever the swarm has it."""
        self.pool = RunnerPool(cfg.sandbox, node.home / "logs", cfg.agent.warm_runners)
        self._tf: TfHost | None = None
        self.handlers: dict[str, tuple[Channel[Any], Callable[[Any], None]]] = {
            "download": (INBOX_CHANNELS["download"], self.on_download),
            "domap": (INBOX_CHANNELS["domap"], self.on_domap),
            "buffer": (INBOX_CHANNELS["buffer"], self.on_buffer),
            "cleanup": (INBOX_CHANNELS["cleanup"], self.on_cleanup),
            "tf": (INBOX_CHANNELS["tf"], self.on_tf),
        }
        self.presence_topic = PRESENCE.topic(node=self.name)
        self.bus = Bus(cfg.broker, f"{self.name}-agent", session_expiry=3600,
                       will=Will(self.presence_topic), on_connected=self.announce)

    # -- lifecycle -------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self.peer_id = self.kubo.id()["ID"]
        self.bus.subscribe(f"ipdc/peer/{self.name}/+")
        self.bus.connect(timeout=30)
        log.info("agent %s (peer %s) serving %d slots", self.name, self.peer_id, self.config.slots)
        threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat").start()
        while not self._stop.is_set():
            try:
                message = self.bus.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.dispatch(message)
        self.shutdown()

    def shutdown(self) -> None:
        log.info("agent %s stopping", self.name)
        self.bus.publish(self.presence_topic, b"", retain=True)
        self.bus.publish(HEARTBEAT.topic(node=self.name), b"", retain=True)
        self.pool.close()
        if self._tf is not None:
            self._tf.close()  # TF servers run in their own sessions: stopping the agent's group misses them
        self.tasks.shutdown(wait=False, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.fetchers.shutdown(wait=False, cancel_futures=True)
        self.bus.close()

    def announce(self) -> None:
        cfg = self.config
        presence = Presence(
            name=self.name, peer_id=self.peer_id, host=cfg.node.host,
            addrs=[self.node.swarm_multiaddr()], caps=capabilities(cfg.node.tf), slots=cfg.slots,
            load=_load(), ts=time.time(), version=__version__,
        )
        self.bus.publish(self.presence_topic, PRESENCE.encode(presence), retain=True)

    def _heartbeat(self) -> None:
        """Beat, and every few beats redial lost bootstrap peers (after a partition heals)."""
        topic = HEARTBEAT.topic(node=self.name)
        beats = 0
        while not self._stop.wait(self.config.agent.heartbeat_interval):
            beat = Heartbeat(name=self.name, ts=time.time(), load=_load(), running=self.running)
            try:
                self.bus.publish(topic, HEARTBEAT.encode(beat), retain=True)
            except Exception:  # noqa: BLE001 - a node that stops beating is taken for dead
                log.exception("heartbeat failed; trying again in %g s", self.config.agent.heartbeat_interval)
            beats += 1
            if beats % 5 == 0:
                try:
                    self.node.connect_swarm(self.kubo)
                except IPDCError as exc:
                    log.warning("swarm check failed: %s", exc)

    # -- dispatch --------------------------------------------------------------------
    def dispatch(self, message: Inbound) -> None:
        channel_name = message.topic.rsplit("/", 1)[-1]
        entry = self.handlers.get(channel_name)
        if entry is None:
            log.warning("dropped a message on unknown topic %s", message.topic)
            return
        channel, handler = entry
        try:
            handler(channel.decode(message.payload))
        except MessageError as exc:
            log.warning("dropped a malformed message on %s: %s", message.topic, exc)
        except Exception:  # noqa: BLE001 - one bad message must never stop the agent
            log.exception("handler for %s failed", message.topic)

    def report(self, result: GetResult) -> None:
        self.bus.publish(GETRESULT.topic(node=self.name, job=result.job_id), GETRESULT.encode(result))

    def _job(self, job_id: str, what: str) -> AgentJob | None:
        job = self.jobs.get(job_id)
        if job is None:
            state = "finished" if job_id in self.finished else "unknown"
            log.warning("ignored %s: the job is %s here", what, state)
        return job

    def _authentic(self, msg: Any, what: str, submitter: str | None) -> str:
        """Why ``msg`` is refused ("" when it is not): it must be signed by a trusted key and,
        within a job, by the job's own ``submitter``. A refusal is logged here."""
        key = signer_of(msg)
        if not msg.sig:
            reason = "it is unsigned"
        elif key not in self.trust:
            reason = (f"its submitter key is not trusted here: to run its jobs on {self.name}, run "
                      f"`ipdc trust add {key}` there")
        elif not verify(msg):
            reason = "its signature does not match its content (forged or tampered)"
        elif submitter is not None and key != submitter:
            reason = "it is signed by another key than the one that submitted the job"
        else:
            return ""
        log.warning("rejected %s: %s", what, reason)
        return reason

    def _submitter(self, job_id: str) -> str | None:
        """The key that owns ``job_id`` here, while the job is held or being fetched."""
        with self._lock:
            job = self.jobs.get(job_id)
            return job.manifest.submitter if job is not None else self.downloading.get(job_id)

    # -- handlers --------------------------------------------------------------------
    def on_download(self, msg: Download) -> None:
        manifest = msg.manifest
        job_id = manifest.job_id
        what = f"download of job {job_id}"
        refused = self._authentic(msg, what, None)
        if refused:
            self._refuse(job_id, refused)
            return
        for name in manifest.code:
            if not SAFE_NAME.fullmatch(name):
                raise MessageError(f"download: unsafe file name {name!r} in job {job_id}")
        if manifest.kind == "mapreduce" and (len(manifest.chunks) == 0 or manifest.partitions == 0):
            raise MessageError(f"download: job {job_id} has no chunks or no reducers")
        with self._lock:
            if job_id in self.finished:
                log.warning("ignored %s: the job is finished here", what)
                return
            job = self.jobs.get(job_id)
            owner = job.manifest.submitter if job is not None else self.downloading.get(job_id)
        if owner is not None:  # a duplicate, or the owner asking again after an outage
            if manifest.submitter != owner:
                log.warning("rejected %s: another submitter already owns the job", what)
            elif job is not None:
                self.report(GetResult(job_id, self.name, "ready"))
            return  # (while the first copy is fetched, that one answers)
        refused = self.nonces.check(manifest.nonce, manifest.submitted_at)
        if refused:
            log.warning("rejected %s: %s", what, refused)
            self._refuse(job_id, refused)
            return
        with self._lock:
            self.downloading[job_id] = manifest.submitter
        self.io.submit(self._download, manifest)

    def _refuse(self, job_id: str, reason: str) -> None:
        """Tell the submitter why we will not run its job, so it replaces us instead of waiting."""
        self.report(GetResult(job_id, self.name, "error", phase="download",
                              error=f"{self.name} refused the job: {reason}"))

    def _download(self, manifest: JobManifest) -> None:
        job_id = manifest.job_id
        job_dir = self.node.work_dir / job_id
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            list(self.fetchers.map(lambda item: self.kubo.cat_to(item[1], job_dir / item[0]),
                                   manifest.code.items()))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the submitter must hear of it
            with self._lock:
                self.downloading.pop(job_id, None)
            if not isinstance(exc, (IPDCError, OSError)):
                log.exception("download of job %s failed", job_id)
            self.report(GetResult(job_id, self.name, "error", phase="download",
                                  error=f"download of the job's code failed on {self.name}: {exc}"))
            return
        with self._lock:
            self.downloading.pop(job_id, None)
            if job_id in self.finished:  # cleaned up while we fetched
                shutil.rmtree(job_dir, ignore_errors=True)
                return
            job = self.jobs[job_id] = AgentJob(manifest, job_dir)
        self.report(GetResult(job_id, self.name, "ready"))
        if manifest.kind == "mapreduce":
            self._prepare_runner(job)

    def _prepare_runner(self, job: AgentJob) -> None:
        """Bind a runner to the job now, while its first task is on its way: most workers
        will run one of its tasks. A failure here is left for the task to meet."""
        try:
            self.pool.release(self.pool.acquire(job.manifest.job_id, job.bind_request(self.kubo.api_url)))
        except TaskFailed as exc:
            log.info("could not prepare a runner for job %s yet: %s", job.manifest.job_id, exc)

    def on_domap(self, msg: DoMap) -> None:
        what = f"domap {msg.task} (attempt {msg.attempt}) of job {msg.job_id}"
        job = self._job(msg.job_id, what)
        if job is None or self._authentic(msg, what, job.manifest.submitter):
            return
        if not 0 <= msg.task < len(job.manifest.chunks):
            raise MessageError(f"domap: task {msg.task} out of range for job {msg.job_id}")
        key = ("map", msg.task, msg.attempt)
        with job.lock:
            cids = job.maps.get(msg.task)
            error = job.failed.get(key)
            start = cids is None and key not in job.started
            if start:
                job.started.add(key)
        if cids is not None:  # computed here already: answer under this attempt, do not recompute
            self.report(GetResult(msg.job_id, self.name, "map", msg.task, msg.attempt, cids))
        elif error is not None:  # failed here: say so again, the first report may have been lost
            self.report(GetResult(msg.job_id, self.name, "error", msg.task, msg.attempt, phase="map", error=error))
        elif start:
            self.tasks.submit(self._run_map, job, msg)

    def _run_map(self, job: AgentJob, msg: DoMap) -> None:
        done = self._run_task(job, "map", msg.task, msg.attempt,
                              {"op": "map", "cid": job.manifest.chunks[msg.task]}, job.manifest.partitions)
        if done is None:
            return
        cids, stats = done
        with job.lock:
            job.maps.setdefault(msg.task, cids)
        self.report(GetResult(msg.job_id, self.name, "map", msg.task, msg.attempt, cids, stats=stats))

    def on_buffer(self, msg: Buffer) -> None:
        what = f"buffer {msg.task}->{msg.partition} (attempt {msg.attempt}) of job {msg.job_id}"
        job = self._job(msg.job_id, what)
        if job is None or self._authentic(msg, what, job.manifest.submitter):
            return
        manifest = job.manifest
        if not 0 <= msg.partition < manifest.partitions or not 0 <= msg.task < len(manifest.chunks):
            raise MessageError(f"buffer: partition {msg.partition} or task {msg.task} out of range")
        slot = (msg.partition, msg.attempt)
        key = ("reduce", *slot)
        cids: list[Cid] = []
        with job.lock:
            done = job.reduces.get(slot)
            error = job.failed.get(key)
            got = job.buffers.setdefault(slot, {})
            got.setdefault(msg.task, msg.cid)
            start = done is None and len(got) == len(manifest.chunks) and key not in job.started
            if start:
                job.started.add(key)
                cids = [got[t] for t in range(len(manifest.chunks))]
        if done is not None:  # the owner sent the set again: it may have missed our answer
            self.report(GetResult(msg.job_id, self.name, "reduce", msg.partition, msg.attempt, done))
        elif error is not None:
            self.report(GetResult(msg.job_id, self.name, "error", msg.partition, msg.attempt, phase="reduce",
                                  error=error))
        elif start:
            self.tasks.submit(self._run_reduce, job, msg.partition, msg.attempt, cids)

    def _run_reduce(self, job: AgentJob, partition: int, attempt: int, cids: list[Cid]) -> None:
        done = self._run_task(job, "reduce", partition, attempt, {"op": "reduce", "cids": cids}, 1)
        if done is None:
            return
        part, stats = done
        with job.lock:
            job.reduces[(partition, attempt)] = part
        self.report(GetResult(job.manifest.job_id, self.name, "reduce", partition, attempt, part, stats=stats))

    def _run_task(self, job: AgentJob, kind: str, task: int, attempt: int, request: dict[str, Any],
                  outputs: int) -> tuple[list[Cid], dict[str, float]] | None:
        """Run one task in a runner: its ``outputs`` CIDs and stats, or None once the failure
        is reported (and remembered, so a repeated request gets the same answer)."""
        job_id = job.manifest.job_id
        with self._lock:
            self.running += 1
        try:
            runner = self.pool.acquire(job_id, job.bind_request(self.kubo.api_url))
            try:
                reply = runner.call(request, timeout=self.config.sandbox.task_timeout)
            finally:
                self.pool.release(runner)
            cids = [Cid(c) for c in reply["cids"]]
            if len(cids) != outputs:
                raise MessageError(f"the runner answered {len(cids)} CIDs, not {outputs}")
            self._keep(job, cids)
            return cids, {k: float(v) for k, v in dict(reply.get("stats", {})).items()}
        except Exception as exc:  # noqa: BLE001 - a task that fails in any way is reported, never lost
            trace = exc.remote_traceback if isinstance(exc, TaskFailed) else ""
            if not isinstance(exc, IPDCError):
                log.exception("%s task %d of job %s broke the runner protocol", kind, task, job_id)
            error = f"{kind} task {task} failed on {self.name}: {exc}\n{trace}"
            log.warning("%s task %d of job %s failed: %s", kind, task, job_id, exc)
            with job.lock:
                job.failed[(kind, task, attempt)] = error
            self.report(GetResult(job_id, self.name, "error", task, attempt, phase=kind, error=error))
            return None
        finally:
            with self._lock:
                self.running -= 1

    def _keep(self, job: AgentJob, cids: list[Cid]) -> None:
        """Note what a task pinned, for CleanUp; a task that outlived its job unpins at once."""
        with job.lock:
            job.created.extend(cids)
        with self._lock:
            gone = job.manifest.job_id in self.finished
        if gone:
            try:
                self.kubo.pin_rm(*cids)
            except IPDCError as exc:
                log.warning("could not unpin late output of job %s: %s", job.manifest.job_id, exc)

    def on_tf(self, msg: Tf) -> None:
        """Reserve ports, start or stop a TF cluster's servers (see ipdc.tf.TfHost)."""
        job = self.jobs.get(msg.cluster_id)
        if self._authentic(msg, f"tf {msg.op} of cluster {msg.cluster_id}", self._submitter(msg.cluster_id)):
            return
        self.io.submit(self.tf_host().handle, msg, job.dir if job is not None else None)

    def tf_host(self) -> TfHost:
        """Made on the first TF request: most agents never host TF, and it costs memory."""
        if self._tf is None:
            from ipdc.agent.tfhost import TfHost
            self._tf = TfHost(self.name, self.config.node.host, self.node.home / "logs", self.report)
        return self._tf

    def on_cleanup(self, msg: CleanUp) -> None:
        if self._authentic(msg, f"cleanup of job {msg.job_id}", self._submitter(msg.job_id)):
            return
        with self._lock:
            job = self.jobs.pop(msg.job_id, None)
            self.finished[msg.job_id] = None
            while len(self.finished) > REMEMBERED_JOBS:
                self.finished.popitem(last=False)
        if job is None:
            log.info("ignored cleanup of job %s: the job is unknown here", msg.job_id)
            return
        self.io.submit(self._cleanup, job)

    def _cleanup(self, job: AgentJob) -> None:
        self.pool.drop(job.manifest.job_id)
        shutil.rmtree(job.dir, ignore_errors=True)
        try:
            self.kubo.pin_rm(*job.created)
        except IPDCError as exc:
            log.warning("could not unpin the files of job %s: %s", job.manifest.job_id, exc)
        log.info("cleaned up job %s", job.manifest.job_id)


def _load() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def main() -> None:
    node = NodeHome()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    Agent(node).run()


if __name__ == "__main__":
    main()
