"""An agent's TF servers: ports reserved, and server processes, per cluster.

See :mod:`ipdc.submit.tf` for the controller that asks for them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ipdc.agent.sandbox import SAFE_ENV
from ipdc.errors import IPDCError, JobError
from ipdc.net import free_port, port_open
from ipdc.spawn import wait_for
from ipdc.wire.getresult import GetResult, clip
from ipdc.wire.ids import NodeName
from ipdc.wire.tf import SPEC_FILE, WORKER_FILE, Tf, TfTask

log = logging.getLogger(__name__)

#: Environment of every TF process: set before TF is imported (see FACTS: TensorFlow).
TF_ENV = {"GRPC_FAIL_FAST": "use_caller", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


@dataclass
class _Hosted:
    """One cluster as one agent hosts it."""

    ports: list[int]
    servers: dict[tuple[str, int], subprocess.Popen[bytes]] = field(default_factory=dict)


class TfHost:
    """An agent's TF servers: ports reserved, and server processes, per cluster.

    Each server is a separate process (``python create_worker.py``) in its own
    session, so it is stopped by process group, and with an environment that holds
    none of the node's secrets.
    """

    def __init__(self, node: str, host: str, log_dir: Path, report: Callable[[GetResult], None],
                 start_timeout: float = 180.0, stop_timeout: float = 5.0) -> None:
        self.node = node
        self.host = host
        self.log_dir = log_dir
        self.report = report
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._clusters: dict[str, _Hosted] = {}
        self._lock = threading.Lock()

    def handle(self, msg: Tf, job_dir: Path | None, re: str) -> None:
        """Serve one Tf request and answer on GetResult; ``job_dir`` holds the Download."""
        cluster_id = msg.cluster_id
        try:
            if msg.op == "port":
                self.report(GetResult(cluster_id, NodeName(self.node), "port", re=re,
                                      ports=self.reserve(cluster_id, msg.count)))
            elif msg.op == "start":
                if job_dir is None:
                    raise JobError(f"start before the Download of TF cluster {cluster_id}")
                self.start(cluster_id, msg.tasks, job_dir)
                self.report(GetResult(cluster_id, NodeName(self.node), "started", re=re))
            else:
                self.stop(cluster_id)
                self.report(GetResult(cluster_id, NodeName(self.node), "stopped", re=re))
        except (IPDCError, OSError, ValueError, KeyError, IndexError) as exc:
            log.warning("TF %s for cluster %s failed: %s", msg.op, cluster_id, exc)
            self.report(GetResult(cluster_id, NodeName(self.node), "error", re=re,
                                  error=clip(f"{msg.op}: {exc}")))

    def reserve(self, cluster_id: str, count: int) -> list[int]:
        """``count`` free ports, never handed out twice while their cluster lives."""
        with self._lock:
            hosted = self._clusters.get(cluster_id)
            if hosted is None:
                taken = {p for c in self._clusters.values() for p in c.ports}
                ports: list[int] = []
                for _ in range(count):
                    ports.append(free_port(self.host, 0, taken))
                    taken.add(ports[-1])
                hosted = self._clusters[cluster_id] = _Hosted(ports)
            return list(hosted.ports)

    def start(self, cluster_id: str, tasks: list[TfTask], job_dir: Path) -> None:
        """Start a server per task (unless it runs), then wait until every port answers."""
        spec = json.loads((job_dir / SPEC_FILE).read_text())["ClusterSpec"]
        env = {k: v for k, v in os.environ.items() if k in SAFE_ENV} | TF_ENV
        with self._lock:
            hosted = self._clusters.get(cluster_id)
            if hosted is None:
                raise JobError(f"no ports were reserved here for TF cluster {cluster_id}")
            wanted: dict[tuple[str, int], int] = {}
            for task in tasks:
                port = int(spec[task.job][task.index].rsplit(":", 1)[1])
                if port not in hosted.ports:
                    raise JobError(f"/job:{task.job}/task:{task.index} is at port {port}, "
                                   "which this agent did not reserve")
                wanted[(task.job, task.index)] = port
                running = hosted.servers.get((task.job, task.index))
                if running is not None and running.poll() is None:
                    continue
                log_file = self.log_dir / f"tf-{cluster_id}-{task.job}-{task.index}.log"
                with open(log_file, "ab") as out:
                    hosted.servers[(task.job, task.index)] = subprocess.Popen(
                        [sys.executable, WORKER_FILE, "--job", task.job, "--index", str(task.index)],
                        cwd=job_dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
                log.info("TF cluster %s: started /job:%s/task:%d (pid %d) on port %d", cluster_id,
                         task.job, task.index, hosted.servers[(task.job, task.index)].pid, port)
            procs = {key: hosted.servers[key] for key in wanted}

        def settled() -> bool:
            return all(port_open(self.host, wanted[key]) or proc.poll() is not None
                       for key, proc in procs.items())

        if not wait_for(settled, self.start_timeout, 0.2):
            raise JobError(f"TF servers did not open their ports within {self.start_timeout:.0f}s")
        dead = [f"/job:{job}/task:{index} ({_tail(self.log_dir / f'tf-{cluster_id}-{job}-{index}.log')})"
                for (job, index), proc in procs.items() if proc.poll() is not None]
        if dead:
            raise JobError(f"TF server(s) exited: {'; '.join(dead)}")

    def stop(self, cluster_id: str) -> None:
        """SIGTERM every server of the cluster, SIGKILL after ``stop_timeout``; free its ports."""
        with self._lock:
            hosted = self._clusters.pop(cluster_id, None)
        if hosted is None:
            return
        procs = list(hosted.servers.values())
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, self.stop_timeout)):
            for proc in procs:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            if wait_for(lambda: all(p.poll() is not None for p in procs), wait, 0.1):
                break
            log.warning("TF servers of cluster %s ignored %s", cluster_id, sig.name)
        log.info("TF cluster %s: stopped %d server(s)", cluster_id, len(procs))

    def close(self) -> None:
        """Stop every server this agent started (the agent is stopping)."""
        with self._lock:
            clusters = list(self._clusters)
        for cluster_id in clusters:
            self.stop(cluster_id)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "no log"
