"""Distributed TensorFlow on the swarm: ``ipdc tf spec.conf``.

The user gives a *virtual* cluster spec, task names and indices only, e.g.
``{"chief": [0], "worker": [0, 1], "ps": [0]}``. Bringing it up:

1. each task gets a peer: the TF-capable peers nearest the cluster name by XOR
   distance, one task per peer while peers last (``ipdc.peers.assign_nearest``);
2. each chosen agent reserves a free port per task it hosts (Tf op ``port``);
3. the controller writes ClusterSpec.json (the real ClusterSpec, a TaskIndex
   ``ip:port -> [job, index]`` and a ready TF_CONFIG per task) and create_worker.py
   (from jobs/tf/create_worker_template.py) under ``$IPDC_HOME/tf/<name>/``, adds
   both to IPFS and sends Download, then Tf ``start``, to each chosen agent;
4. each agent runs one create_worker.py process per task (a ``tf.distribute.Server``)
   and answers once the server's port answers; the controller checks every port
   itself, then prints how to run the user's script as the chief.

Tasks of the ``chief`` job are the user's script (a ParameterServerStrategy
coordinator), so no server is started for them; their port stays reserved.

The cluster outlives the command. ``ipdc tf down NAME`` stops its servers (Tf op
``stop``), sends CleanUp and removes the generated files; an agent that stops
also stops the servers it started (:class:`TfHost`).

No TensorFlow import happens here: the agent and the CLI stay light.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import re
import shlex
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ipdc.errors import (
    IPDCError,
    JobError,
    KuboError,
    NotEnoughPeers,
    SpecError,
    TaskFailed,
)
from ipdc.jobs import shipped
from ipdc.kubo import KuboClient
from ipdc.net import port_open
from ipdc.peers import Peer, assign_nearest
from ipdc.spawn import wait_for
from ipdc.submit.client import SwarmClient
from ipdc.wire.cleanup import CLEANUP, CleanUp
from ipdc.wire.download import DOWNLOAD, Download
from ipdc.wire.getresult import GetResult
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest
from ipdc.wire.schema import build
from ipdc.wire.tf import SPEC_FILE, TASK_TYPE, TF, WORKER_FILE, Tf, TfTask

log = logging.getLogger(__name__)

TF_JOBS_DIR = shipped("tf")
TEMPLATE = TF_JOBS_DIR / "create_worker_template.py"
EXAMPLE = TF_JOBS_DIR / "example.py"
STATE_FILE = "cluster.json"
#: Jobs whose tasks are the user's own script (the coordinator), not a server.
COORDINATOR_JOBS = ("chief",)
#: Memory one TF process needs (measured ~550 MB RSS): a peer hosts at most free/this tasks.
TF_TASK_MB = 600
CLUSTER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


# -- the spec --------------------------------------------------------------------------
def parse_spec(data: Any, source: str = "spec") -> dict[str, list[int]]:
    """Validate a virtual cluster spec: ``{job: [0, 1, ...]}``, indices 0..n-1 each.

    Errors are SpecError naming ``source`` and the bad key, so a user can fix the
    file at once. Jobs come back sorted by name, indices ascending.
    """
    if not isinstance(data, dict) or not data:
        raise SpecError(f"{source}: expected a mapping of task names to index lists, such as "
                        '{"chief": [0], "worker": [0, 1], "ps": [0]}')
    spec: dict[str, list[int]] = {}
    for job in sorted(data, key=str):
        indices = data[job]
        if not isinstance(job, str) or not TASK_TYPE.fullmatch(job):
            raise SpecError(f"{source}: task name {job!r} is not valid: use lower-case letters, "
                            "digits and '_', starting with a letter")
        if not isinstance(indices, list) or not indices or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise SpecError(f"{source}: {job!r} must be a non-empty list of task indices such as "
                            f"[0, 1], not {indices!r}")
        if sorted(indices) != list(range(len(indices))):
            raise SpecError(f"{source}: {job!r} must number its tasks 0..{len(indices) - 1} "
                            f"once each, not {indices!r}")
        if job in COORDINATOR_JOBS and len(indices) != 1:
            raise SpecError(f"{source}: {job!r} has one task only ([0]), not {indices!r}")
        spec[job] = sorted(indices)
    return spec


def load_spec(path: Path) -> dict[str, list[int]]:
    """Read spec.conf, YAML or JSON (YAML reads both)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read the TF spec {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML or JSON: {exc}") from None
    return parse_spec(data, str(path))


def tf_capacity(peer: Peer) -> int:
    """How many TF tasks a peer may host: no more than its slots or its free memory allows."""
    return min(peer.presence.slots, peer.presence.caps.mem_free_mb // TF_TASK_MB)


# -- a cluster as the controller records it ---------------------------------------------
@dataclass(frozen=True)
class Placement:
    """One task, where it runs and who runs it."""

    job: str
    index: int
    address: str
    peer: str
    server: bool
    """False for a coordinator task (the user's script): only its port is reserved."""


@dataclass
class TfCluster:
    """What ``ipdc tf`` brought up; saved as cluster.json next to the generated files."""

    name: str
    cluster_id: str
    dir: str
    tasks: list[Placement]
    cluster_spec: dict[str, list[str]]
    tf_config: dict[str, list[str]]
    cids: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def peers(self) -> list[str]:
        return sorted({t.peer for t in self.tasks})

    @property
    def servers(self) -> list[Placement]:
        return [t for t in self.tasks if t.server]

    def command(self) -> str:
        """The shell command that runs the user's script against this cluster."""
        chief = self.tf_config.get(COORDINATOR_JOBS[0])
        config = chief[0] if chief else json.dumps({"cluster": self.cluster_spec})
        script = EXAMPLE if chief and {"ps", "worker"} <= self.cluster_spec.keys() else "your_script.py"
        return f"TF_CONFIG={shlex.quote(config)} python {script}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "command": self.command()}

    def spec_file(self) -> dict[str, Any]:
        """The content of ClusterSpec.json."""
        return {
            "name": self.name,
            "ClusterSpec": self.cluster_spec,
            "TaskIndex": {t.address: [t.job, t.index] for t in self.tasks},
            "TF_CONFIG": self.tf_config,
        }


def make_cluster(name: str, cluster_id: str, directory: Path,
                 tasks: list[tuple[str, int, Peer, int]]) -> TfCluster:
    """The real cluster from placed tasks ``(job, index, peer, port)``."""
    placements = [Placement(job, index, f"{peer.presence.host}:{port}", peer.name,
                            job not in COORDINATOR_JOBS) for job, index, peer, port in tasks]
    spec: dict[str, list[str]] = {}
    for p in placements:
        spec.setdefault(p.job, []).append(p.address)
    tf_config = {job: [json.dumps({"cluster": spec, "task": {"type": job, "index": i}})
                       for i in range(len(addresses))] for job, addresses in spec.items()}
    return TfCluster(name, cluster_id, str(directory), placements, spec, tf_config)


def cluster_root(home: Path) -> Path:
    return home / "tf"


def load_cluster(home: Path, name: str) -> TfCluster:
    path = cluster_root(home) / name / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"no TF cluster named {name!r} was started from this node "
                        f"({home}); see `ipdc tf list`") from None
    except ValueError as exc:
        raise SpecError(f"{path} is corrupt ({exc}); remove {path.parent} by hand") from None
    data.pop("command", None)
    return build(TfCluster, data, str(path), SpecError)


def list_clusters(home: Path) -> list[TfCluster]:
    root = cluster_root(home)
    if not root.is_dir():
        return []
    return [load_cluster(home, d.name) for d in sorted(root.iterdir()) if (d / STATE_FILE).exists()]


def answers(address: str) -> bool:
    """True when ``host:port`` accepts a TCP connection."""
    host, port = address.rsplit(":", 1)
    return port_open(host, int(port))


def cluster_is_up(cluster: TfCluster) -> bool:
    """True when every server's port answers."""
    return all(answers(t.address) for t in cluster.servers)


# -- the controller ---------------------------------------------------------------------
class TfController:
    """Brings TF clusters up and down from the submitting node."""

    def __init__(self, client: SwarmClient, kubo: KuboClient, home: Path, timeout: float = 180.0) -> None:
        self.client = client
        self.kubo = kubo
        self.home = home
        self.timeout = timeout

    def place(self, spec: dict[str, list[int]], name: str) -> list[tuple[str, int, Peer]]:
        """A peer for every task, by XOR distance to the cluster name; TF peers only."""
        tasks = [(job, i) for job, indices in spec.items() for i in indices]
        live = self.client.peers.live()
        hosts = assign_nearest(live, name, len(tasks), tf_capacity, lambda p: p.presence.caps.tf)
        if len(hosts) < len(tasks):
            capable = [p for p in live if p.presence.caps.tf]
            room = ", ".join(f"{p.name}: {tf_capacity(p)}" for p in capable) or "none"
            raise NotEnoughPeers(
                f"the spec asks for {len(tasks)} TF tasks but the swarm can host {len(hosts)}: "
                f"{len(capable)} of {len(live)} live peer(s) have TensorFlow (tasks each: {room}; "
                f"a peer hosts at most its slots, and one task per {TF_TASK_MB} MB free). "
                "Install TF on more nodes (`python deploy.py init --with-tf`) or shrink the spec"
            )
        return [(job, i, peer) for (job, i), peer in zip(tasks, hosts)]

    def up(self, spec: dict[str, list[int]], name: str | None = None) -> TfCluster:
        cluster_id = JobId.new()
        name = name or f"tf-{cluster_id[:8]}"
        if not CLUSTER_NAME.fullmatch(name):
            raise SpecError(f"--name {name!r}: use lower-case letters, digits and '-' (at most 63)")
        directory = cluster_root(self.home) / name
        if directory.exists():
            raise SpecError(f"a TF cluster named {name!r} exists already: `ipdc tf down {name}` "
                            "first, or choose another --name")
        placed = self.place(spec, name)
        peers = {peer.name: peer for _, _, peer in placed}
        log.info("TF cluster %s (%s): %s", name, cluster_id,
                 ", ".join(f"{job}:{i}@{peer.name}" for job, i, peer in placed))
        results = self.client.watch(cluster_id)
        cluster: TfCluster | None = None
        try:
            ports = self._reserve(cluster_id, placed, results)
            cluster = make_cluster(name, cluster_id, directory,
                                   [(job, i, peer, ports[peer.name].pop(0)) for job, i, peer in placed])
            self._write(cluster)
            self._download(cluster, list(peers), results)
            self._start(cluster, results)
            (directory / STATE_FILE).write_text(json.dumps(cluster.to_dict(), indent=2) + "\n")
            return cluster
        except BaseException:
            try:
                self._teardown(cluster_id, list(peers), results, cluster.cids if cluster else {}, directory)
            except IPDCError as exc:  # the first error is the one to report
                log.warning("TF cluster %s: tearing down after a failed start: %s", name, exc)
            raise
        finally:
            self.client.unwatch(cluster_id)

    def down(self, name: str) -> TfCluster:
        cluster = load_cluster(self.home, name)
        results = self.client.watch(cluster.cluster_id)
        try:
            self._teardown(cluster.cluster_id, cluster.peers, results, cluster.cids, Path(cluster.dir))
        finally:
            self.client.unwatch(cluster.cluster_id)
        return cluster

    # -- steps -----------------------------------------------------------------------
    def _reserve(self, cluster_id: str, placed: list[tuple[str, int, Peer]],
                 results: "queue.Queue[GetResult]") -> dict[str, list[int]]:
        counts: dict[str, int] = {}
        for _, _, peer in placed:
            counts[peer.name] = counts.get(peer.name, 0) + 1
        for peer_name, count in counts.items():
            self.client.send(TF, peer_name, Tf("port", JobId(cluster_id), count=count))
        replies = self._await(results, set(counts), "port", "reserve ports")
        for peer_name, reply in replies.items():
            if len(reply.ports) != counts[peer_name]:
                raise JobError(f"{peer_name} reserved {len(reply.ports)} ports, not {counts[peer_name]}")
        return {peer_name: list(reply.ports) for peer_name, reply in replies.items()}

    def _write(self, cluster: TfCluster) -> None:
        """Write ClusterSpec.json and create_worker.py, and add both to IPFS."""
        directory = Path(cluster.dir)
        directory.mkdir(parents=True)
        (directory / SPEC_FILE).write_text(json.dumps(cluster.spec_file(), indent=2) + "\n")
        worker = string.Template(TEMPLATE.read_text()).substitute(name=cluster.name)
        (directory / WORKER_FILE).write_text(worker)
        with open(directory / SPEC_FILE, "rb") as spec, open(directory / WORKER_FILE, "rb") as code:
            cids = self.kubo.add_streams([(SPEC_FILE, spec), (WORKER_FILE, code)])
        cluster.cids = {SPEC_FILE: cids[0], WORKER_FILE: cids[1]}

    def _download(self, cluster: TfCluster, peers: list[str], results: "queue.Queue[GetResult]") -> None:
        manifest = JobManifest(
            job_id=JobId(cluster.cluster_id), owner=NodeName(self.client.name),
            code={n: Cid(c) for n, c in cluster.cids.items()}, chunks=[], partitions=0,
            workers=[NodeName(p) for p in peers],
            submitter=self.client.submitter, kind="tf", params={"name": cluster.name},
        )
        for peer_name in peers:
            self.client.send(DOWNLOAD, peer_name, Download(manifest))
        self._await(results, set(peers), "ready", "download ClusterSpec.json and create_worker.py")

    def _start(self, cluster: TfCluster, results: "queue.Queue[GetResult]") -> None:
        by_peer: dict[str, list[TfTask]] = {}
        for t in cluster.servers:
            by_peer.setdefault(t.peer, []).append(TfTask(t.job, t.index))
        for peer_name, tasks in by_peer.items():
            self.client.send(TF, peer_name, Tf("start", JobId(cluster.cluster_id), tasks=tasks))
        self._await(results, set(by_peer), "started", "start its TF servers")
        closed = [t.address for t in cluster.servers if not answers(t.address)]
        if closed and not wait_for(lambda: cluster_is_up(cluster), 30, 0.2):
            raise JobError(f"TF cluster {cluster.name}: the agents started the servers, but "
                           f"{', '.join(closed)} do not answer from this node (a firewall?)")

    def _teardown(self, cluster_id: str, peers: list[str], results: "queue.Queue[GetResult]",
                  cids: dict[str, str], directory: Path) -> None:
        """Stop every server, drop the agents' copies, unpin and delete the files."""
        for peer_name in peers:
            self.client.send(TF, peer_name, Tf("stop", JobId(cluster_id)))
        try:
            self._await(results, set(peers), "stopped", "stop its TF servers", lenient=True)
        finally:
            for peer_name in peers:
                self.client.send(CLEANUP, peer_name, CleanUp(JobId(cluster_id)))
            for cid in cids.values():
                try:
                    self.kubo.pin_rm(cid)
                except KuboError as exc:
                    log.warning("could not unpin %s: %s", cid, exc)
            shutil.rmtree(directory, ignore_errors=True)

    def _await(self, results: "queue.Queue[GetResult]", peers: set[str], kind: str, what: str,
               lenient: bool = False) -> dict[str, GetResult]:
        """One ``kind`` reply from each of ``peers``.

        Raises on an ``error`` reply, a peer that leaves, or the timeout; when
        ``lenient`` (tearing down), a peer that is gone no longer counts, since its
        agent stopped its servers on the way out, and an error is only logged.
        """
        got: dict[str, GetResult] = {}
        deadline = time.monotonic() + self.timeout
        while peers - got.keys():
            missing = peers - got.keys()
            if time.monotonic() > deadline:
                raise JobError(f"no answer from {', '.join(sorted(missing))} to {what} "
                               f"within {self.timeout:.0f}s")
            try:
                reply = results.get(timeout=0.5)
            except queue.Empty:
                gone = missing - {p.name for p in self.client.peers.live()}
                if gone and lenient:
                    log.warning("%s left the swarm; its agent stopped its TF servers", ", ".join(gone))
                    peers = peers - gone
                elif gone:
                    raise JobError(f"peer(s) {', '.join(sorted(gone))} left the swarm while waiting "
                                   f"for them to {what}")
                continue
            if reply.peer not in peers:
                continue
            if reply.kind == "error" and not lenient:
                raise TaskFailed(f"{reply.peer} failed to {what}: {reply.error}", peer=reply.peer)
            if reply.kind in (kind, "error"):
                got.setdefault(reply.peer, reply)
        return got
