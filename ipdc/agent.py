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
"""

from __future__ import annotations

import importlib.util
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
from typing import Any

from channels import INBOX_CHANNELS
from channels.base import Channel
from channels.buffer import BUFFER, Buffer
from channels.cleanup import CleanUp
from channels.domap import DoMap
from channels.download import Download
from channels.getresult import GETRESULT, GetResult
from channels.heartbeat import HEARTBEAT, Heartbeat
from channels.presence import PRESENCE, Capabilities, Presence
from channels.tf import Tf
from ipdc import __version__
from ipdc.bus import Bus, Inbound, Will
from ipdc.errors import IPDCError, MessageError, TaskFailed
from ipdc.ids import Cid
from ipdc.job import JobManifest
from ipdc.kubo import KuboClient
from ipdc.node import Node
from ipdc.sandbox import RunnerPool
from ipdc.tf import TfHost

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
    buffers: dict[int, dict[int, Cid]] = field(default_factory=dict)
    started: set[tuple[str, int]] = field(default_factory=set)
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

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = cfg = node.config
        self.name = cfg.node.name
        self.kubo = KuboClient(cfg.kubo_api_url, timeout=600)
        self.jobs: dict[str, AgentJob] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.running = 0
        self.peer_id = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.tasks = ThreadPoolExecutor(cfg.slots, thread_name_prefix="task")
        self.io = ThreadPoolExecutor(4, thread_name_prefix="io")
        self.pool = RunnerPool(cfg.sandbox, node.home / "logs", cfg.agent.warm_runners)
        self.tf = TfHost(self.name, cfg.node.host, node.home / "logs", self.report)
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
        self.tf.close()  # TF servers run in their own sessions: stopping the agent's group misses them
        self.tasks.shutdown(wait=False, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)
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
            self.bus.publish(topic, HEARTBEAT.encode(beat), retain=True)
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
            log.warning("ignored %s for %s job %s", what, state, job_id)
        return job

    # -- handlers --------------------------------------------------------------------
    def on_download(self, msg: Download) -> None:
        manifest = msg.manifest
        for name in manifest.code:
            if not SAFE_NAME.fullmatch(name):
                raise MessageError(f"download: unsafe file name {name!r} in job {manifest.job_id}")
        if manifest.job_id in self.finished:
            log.warning("ignored download of finished job %s", manifest.job_id)
            return
        if manifest.kind == "mapreduce" and (len(manifest.chunks) == 0 or manifest.partitions == 0):
            raise MessageError(f"download: job {manifest.job_id} has no chunks or no reducers")
        self.io.submit(self._download, manifest)

    def _download(self, manifest: JobManifest) -> None:
        job_id = manifest.job_id
        with self._lock:
            known = job_id in self.jobs
        if not known:
            job_dir = self.node.work_dir / job_id
            try:
                job_dir.mkdir(parents=True, exist_ok=True)
                for name, cid in manifest.code.items():
                    self.kubo.cat_to(cid, job_dir / name)
            except IPDCError as exc:
                self.report(GetResult(job_id, self.name, "error", error=f"download failed: {exc}"))
                return
            with self._lock:
                self.jobs.setdefault(job_id, AgentJob(manifest, job_dir))
        self.report(GetResult(job_id, self.name, "ready"))

    def on_domap(self, msg: DoMap) -> None:
        job = self._job(msg.job_id, f"domap {msg.task}")
        if job is None:
            return
        if not 0 <= msg.task < len(job.manifest.chunks):
            raise MessageError(f"domap: task {msg.task} out of range for job {msg.job_id}")
        with job.lock:
            if msg.task in job.maps:  # a duplicate: answer again, do not recompute
                self._send_map_output(job, msg.task, msg.attempt, job.maps[msg.task])
                return
            if ("map", msg.task) in job.started:
                return
            job.started.add(("map", msg.task))
        self.tasks.submit(self._run_map, job, msg)

    def _run_map(self, job: AgentJob, msg: DoMap) -> None:
        reply = self._run_task(job, "map", msg.task, msg.attempt,
                               {"op": "map", "cid": job.manifest.chunks[msg.task]})
        if reply is None:
            return
        cids = [Cid(c) for c in reply["cids"]]
        with job.lock:
            job.maps[msg.task] = cids
            job.created.extend(cids)
        self._send_map_output(job, msg.task, msg.attempt, cids, reply.get("stats", {}))

    def _send_map_output(self, job: AgentJob, task: int, attempt: int, cids: list[Cid],
                         stats: dict[str, float] | None = None) -> None:
        for partition, cid in enumerate(cids):
            reducer = job.manifest.reducers[partition]
            self.bus.publish(BUFFER.topic(node=reducer),
                             BUFFER.encode(Buffer(job.manifest.job_id, partition, task, cid)))
        self.report(GetResult(job.manifest.job_id, self.name, "map", task, attempt, cids,
                              stats=stats or {}))

    def on_buffer(self, msg: Buffer) -> None:
        job = self._job(msg.job_id, f"buffer {msg.task}->{msg.partition}")
        if job is None:
            return
        manifest = job.manifest
        if not 0 <= msg.partition < manifest.partitions or not 0 <= msg.task < len(manifest.chunks):
            raise MessageError(f"buffer: partition {msg.partition} or task {msg.task} out of range")
        if manifest.reducers[msg.partition] != self.name:
            raise MessageError(f"buffer: partition {msg.partition} of {msg.job_id} is not ours")
        with job.lock:
            got = job.buffers.setdefault(msg.partition, {})
            got.setdefault(msg.task, msg.cid)
            if len(got) < len(manifest.chunks) or ("reduce", msg.partition) in job.started:
                return
            job.started.add(("reduce", msg.partition))
            cids = [got[t] for t in range(len(manifest.chunks))]
        self.tasks.submit(self._run_reduce, job, msg.partition, cids)

    def _run_reduce(self, job: AgentJob, partition: int, cids: list[Cid]) -> None:
        reply = self._run_task(job, "reduce", partition, 0, {"op": "reduce", "cids": cids})
        if reply is None:
            return
        part = [Cid(c) for c in reply["cids"]]
        with job.lock:
            job.created.extend(part)
        self.report(GetResult(job.manifest.job_id, self.name, "reduce", partition, 0, part,
                              stats=reply.get("stats", {})))

    def _run_task(self, job: AgentJob, kind: str, task: int, attempt: int,
                  request: dict[str, Any]) -> dict[str, Any] | None:
        """Run one task in a runner; on failure report the error and return None."""
        job_id = job.manifest.job_id
        with self._lock:
            self.running += 1
        try:
            runner = self.pool.acquire(job_id, job.bind_request(self.kubo.api_url))
            try:
                reply = runner.call(request, timeout=self.config.sandbox.task_timeout)
            finally:
                self.pool.release(runner)
            return reply
        except TaskFailed as exc:
            log.warning("%s task %d of job %s failed: %s", kind, task, job_id, exc)
            self.report(GetResult(job_id, self.name, "error", task, attempt,
                                  error=f"{kind} task {task} failed on {self.name}: {exc}\n"
                                        f"{exc.remote_traceback}"))
            return None
        finally:
            with self._lock:
                self.running -= 1

    def on_tf(self, msg: Tf) -> None:
        """Reserve ports, start or stop a TF cluster's servers (see ipdc.tf.TfHost)."""
        job = self.jobs.get(msg.cluster_id)
        self.io.submit(self.tf.handle, msg, job.dir if job is not None else None)

    def on_cleanup(self, msg: CleanUp) -> None:
        with self._lock:
            job = self.jobs.pop(msg.job_id, None)
            self.finished[msg.job_id] = None
            while len(self.finished) > REMEMBERED_JOBS:
                self.finished.popitem(last=False)
        if job is None:
            return
        self.io.submit(self._cleanup, job)

    def _cleanup(self, job: AgentJob) -> None:
        self.pool.drop(job.manifest.job_id)
        shutil.rmtree(job.dir, ignore_errors=True)
        for cid in job.created:
            try:
                self.kubo.pin_rm(cid)
            except IPDCError as exc:
                log.warning("could not unpin %s of job %s: %s", cid, job.manifest.job_id, exc)
        log.info("cleaned up job %s", job.manifest.job_id)


def _load() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def main() -> None:
    node = Node()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    Agent(node).run()


if __name__ == "__main__":
    main()
