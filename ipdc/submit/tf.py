"""Distributed TensorFlow on the swarm: ``ipdc tf spec.conf``, ``ipdc tf run``, ``ipdc tf down``.

The user gives a *virtual* cluster spec, task names and indices only, e.g.
``{"chief": [0], "worker": [0, 1], "ps": [0]}``. Bringing it up:

1. each server task (every job but ``chief``) gets a peer: the TF-capable peers nearest
   the cluster name by XOR distance, one task per peer while peers last
   (``ipdc.peers.assign_nearest``). The chief is the user's script, run on this node;
2. the controller sends each of those nodes, and this one, a Download whose manifest
   carries the cluster's plan as data (:class:`ipdc.wire.tf.TfPlan`: who hosts which
   task, and each host's kubo peer ID), then Tf ``start``. Each agent then forwards to
   the tasks hosted elsewhere over the private libp2p swarm, and starts its own servers
   in loopback-only sandboxes (:mod:`ipdc.agent.tfhost`);
3. the controller checks that every server answers gRPC through this node's forwards,
   i.e. across the swarm, and prints how to run the user's script:
   ``ipdc tf run NAME -- python script.py`` runs it as the chief in a network namespace
   of its own, with relays to every server and the right ``TF_CONFIG``.

No TF port is ever on a network: every task listens on a fixed loopback address in its
own namespace, and the only way in is a stream of the private swarm from one of the
cluster's own hosts. The cluster outlives the command: this node's agent renews its
lease with every host. ``ipdc tf down NAME`` stops its servers, relays, listeners,
forwards and sockets on every host (Tf ``stop``, then CleanUp).

No TensorFlow import happens here: the agent and the CLI stay light.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ipdc.errors import IPDCError, JobError, NotEnoughPeers, SpecError, TaskFailed
from ipdc.home import RenewedJobs
from ipdc.jobs import shipped
from ipdc.net import grpc_answers
from ipdc.peers import Peer, assign_nearest
from ipdc.spawn import PACKAGE, wait_for
from ipdc.submit.client import SwarmClient
from ipdc.tfsandbox import chief_argv, isolation_problem, refusal
from ipdc.wire.channel import Channel
from ipdc.wire.cleanup import CLEANUP, CleanUp
from ipdc.wire.download import DOWNLOAD, Download
from ipdc.wire.getresult import GetResult
from ipdc.wire.ids import JobId, NodeName
from ipdc.wire.manifest import JobManifest
from ipdc.wire.schema import build
from ipdc.wire.tf import (
    COORDINATOR_JOBS,
    MAX_TASKS,
    TASK_TYPE,
    TF,
    Task,
    Tf,
    TfPlan,
    base_port,
    cluster_dir,
    cluster_token,
)

log = logging.getLogger(__name__)

EXAMPLE = shipped("tf", "example.py")
STATE_FILE = "cluster.json"
#: Memory one TF process needs (measured ~550 MB RSS): a peer hosts at most free/this tasks.
TF_TASK_MB = 600
CLUSTER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: Seconds ``ipdc tf down`` waits for the hosts to say they stopped, before it goes on regardless.
STOP_TIMEOUT = 30.0


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
    if set(spec) <= set(COORDINATOR_JOBS):
        raise SpecError(f"{source}: no server task: add jobs such as \"worker\" and \"ps\" beside "
                        f"{', '.join(COORDINATOR_JOBS)}")
    if sum(map(len, spec.values())) > MAX_TASKS:
        raise SpecError(f"{source}: at most {MAX_TASKS} tasks in one cluster")
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


# -- a cluster as its owner records it ----------------------------------------------------
@dataclass
class TfCluster:
    """What ``ipdc tf`` brought up; saved as ``$IPDC_HOME/tf/<name>/cluster.json``."""

    name: str
    cluster_id: str
    submitter: str
    plan: dict[str, Any]
    """The :class:`TfPlan` as its manifest carried it."""
    sockets: str
    """This node's directory of the cluster's sockets: the chief's way to every server."""
    created: float = field(default_factory=time.time)

    @property
    def tf_plan(self) -> TfPlan:
        return TfPlan.from_params(self.plan)

    @property
    def peers(self) -> list[str]:
        return self.tf_plan.hosts

    @property
    def servers(self) -> list[Task]:
        return self.tf_plan.servers()

    def tf_config(self) -> dict[str, Any]:
        """The chief's TF_CONFIG (a client's, when the spec has no chief)."""
        plan = self.tf_plan
        config: dict[str, Any] = {"cluster": plan.cluster_spec()}
        if COORDINATOR_JOBS[0] in plan.tasks:
            config["task"] = {"type": COORDINATOR_JOBS[0], "index": 0}
        return config

    def command(self) -> str:
        """How the user runs a script as the chief of this cluster."""
        plan = self.tf_plan
        example = COORDINATOR_JOBS[0] in plan.tasks and {"ps", "worker"} <= plan.tasks.keys()
        script = shlex.quote(str(EXAMPLE)) if example else "your_script.py"
        return f"ipdc tf run {self.name} -- python {script}"

    def to_dict(self) -> dict[str, Any]:
        """The record, plus what a script wants to know: tasks, ClusterSpec, TF_CONFIG, command."""
        tasks = [{"job": t.job, "index": t.index, "peer": t.host, "address": f"127.0.0.1:{t.port}",
                  "server": t.server} for t in self.tf_plan.task_list()]
        return {"name": self.name, "cluster_id": self.cluster_id, "submitter": self.submitter,
                "plan": self.plan, "sockets": self.sockets, "created": self.created, "tasks": tasks,
                "cluster_spec": self.tf_plan.cluster_spec(), "tf_config": self.tf_config(),
                "command": self.command()}


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
    record = {k: v for k, v in data.items() if k in TfCluster.__dataclass_fields__}
    return build(TfCluster, record, str(path), SpecError)


def list_clusters(home: Path) -> list[TfCluster]:
    root = cluster_root(home)
    if not root.is_dir():
        return []
    return [load_cluster(home, d.name) for d in sorted(root.iterdir()) if (d / STATE_FILE).exists()]


def unanswered(cluster: TfCluster) -> list[str]:
    """The servers that do not answer gRPC through this node's sockets: across the swarm,
    through the relays, the peer checks and their sandboxes."""
    return [f"/job:{t.job}/task:{t.index}" for t in cluster.servers
            if not grpc_answers(Path(cluster.sockets) / t.sock)]


# -- the controller ---------------------------------------------------------------------
class TfController:
    """Brings TF clusters up and down from the submitting node."""

    def __init__(self, client: SwarmClient, home: Path, timeout: float = 240.0) -> None:
        self.client = client
        self.home = home
        self.timeout = timeout
        self.renewed = RenewedJobs(home)
        self.sent: dict[str, set[str]] = {}
        """Peer -> digests of the requests sent to it: only replies to these count."""

    def place(self, spec: dict[str, list[int]], name: str) -> dict[str, list[NodeName]]:
        """A peer for every server task, by XOR distance to the cluster name, TF peers only;
        the chief (the user's script) on this node."""
        tasks = [(job, i) for job, indices in spec.items() if job not in COORDINATOR_JOBS for i in indices]
        live = self.client.peers.live()
        hosts = assign_nearest(live, name, len(tasks), tf_capacity, lambda p: p.presence.caps.tf)
        if len(hosts) < len(tasks):
            capable = [p for p in live if p.presence.caps.tf]
            room = ", ".join(f"{p.name}: {tf_capacity(p)}" for p in capable) or "none"
            raise NotEnoughPeers(
                f"the spec asks for {len(tasks)} TF server tasks but the swarm can host {len(hosts)}: "
                f"{len(capable)} of {len(live)} live peer(s) have TensorFlow (tasks each: {room}; "
                f"a peer hosts at most its slots, and one task per {TF_TASK_MB} MB free). "
                "Install TF on more nodes (`python deploy.py init --with-tf`) or shrink the spec"
            )
        placed: dict[str, list[NodeName]] = {job: [NodeName(self.client.name)] for job in spec
                                             if job in COORDINATOR_JOBS}
        for (job, _), peer in zip(tasks, hosts, strict=True):
            placed.setdefault(job, []).append(NodeName(peer.name))
        return placed

    def up(self, spec: dict[str, list[int]], name: str | None = None) -> TfCluster:
        cluster_id = JobId.new()
        name = name or f"tf-{cluster_id[:8]}"
        if not CLUSTER_NAME.fullmatch(name):
            raise SpecError(f"--name {name!r}: use lower-case letters, digits and '-' (at most 63)")
        record_dir = cluster_root(self.home) / name
        if record_dir.exists():
            raise SpecError(f"a TF cluster named {name!r} exists already: `ipdc tf down {name}` "
                            "first, or choose another --name")
        placed = self.place(spec, name)
        live = {p.name: p for p in self.client.peers.live()}
        if self.client.name not in live:
            raise JobError(f"this node ({self.client.name}) is not live in the swarm: its agent "
                           "hosts the chief's side of the cluster, so start it (`python deploy.py start`)")
        hosts = sorted({h for nodes in placed.values() for h in nodes} | {self.client.name})
        token = cluster_token(self.client.submitter, cluster_id)
        plan = TfPlan(name, placed, {NodeName(h): live[h].peer_id for h in hosts}, base_port(token))
        cluster = TfCluster(name, cluster_id, self.client.submitter, plan.to_params(),
                            str(cluster_dir(self.home, token)))
        log.info("TF cluster %s (%s): %s", name, cluster_id,
                 ", ".join(f"{t.name}@{t.host}" for t in plan.task_list()))
        results = self.client.watch(cluster_id)
        self.renewed.add(cluster_id, hosts)
        holding: list[str] = []
        try:
            self._download(cluster, plan, results)
            holding = hosts
            self._ask(cluster_id, hosts, "start", results, "start its part of the cluster")
            if not wait_for(lambda: not unanswered(cluster), 30, 0.2):
                raise JobError(f"TF cluster {name}: every host started its servers, but "
                               f"{', '.join(unanswered(cluster))} do not answer through this node's "
                               f"forwards in {cluster.sockets}; see the hosts' logs/runners.log")
            record_dir.mkdir(parents=True)
            (record_dir / STATE_FILE).write_text(json.dumps(cluster.to_dict(), indent=2) + "\n")
            return cluster
        except BaseException:
            try:
                self._teardown(cluster_id, holding, hosts, results)
            except IPDCError as exc:  # the first error is the one to report
                log.warning("TF cluster %s: tearing down after a failed start: %s", name, exc)
            shutil.rmtree(record_dir, ignore_errors=True)
            raise
        finally:
            self.client.unwatch(cluster_id)

    def down(self, name: str) -> TfCluster:
        cluster = load_cluster(self.home, name)
        results = self.client.watch(cluster.cluster_id)
        try:
            self._teardown(cluster.cluster_id, cluster.peers, cluster.peers, results)
        finally:
            self.client.unwatch(cluster.cluster_id)
            shutil.rmtree(cluster_root(self.home) / name, ignore_errors=True)
        return cluster

    # -- steps -----------------------------------------------------------------------
    def _send(self, channel: Channel[Any], peer: str, message: Any) -> None:
        self.sent.setdefault(peer, set()).add(self.client.send(channel, peer, message))

    def _download(self, cluster: TfCluster, plan: TfPlan, results: queue.Queue[GetResult]) -> None:
        manifest = JobManifest(
            job_id=JobId(cluster.cluster_id), owner=NodeName(self.client.name), code={}, chunks=[],
            partitions=0, workers=[NodeName(h) for h in plan.hosts], submitter=self.client.submitter,
            kind="tf", params=plan.to_params(),
        )
        for peer in plan.hosts:
            self._send(DOWNLOAD, peer, Download(manifest))
        self._await(results, set(plan.hosts), "ready", "accept the cluster")

    def _ask(self, cluster_id: str, peers: list[str], op: str, results: queue.Queue[GetResult], what: str,
             lenient: bool = False) -> None:
        for peer in peers:
            self._send(TF, peer, Tf(op, JobId(cluster_id)))
        self._await(results, set(peers), {"start": "started", "stop": "stopped"}[op], what, lenient)

    def _teardown(self, cluster_id: str, holding: list[str], peers: list[str],
                  results: queue.Queue[GetResult]) -> None:
        """Stop the part of the cluster on each host ``holding`` it, then drop it on all ``peers``."""
        self.renewed.remove(cluster_id)
        try:
            self._ask(cluster_id, holding, "stop", results, "stop its part of the cluster", lenient=True)
        finally:
            for peer in peers:
                self.client.send(CLEANUP, peer, CleanUp(JobId(cluster_id)))

    def _await(self, results: queue.Queue[GetResult], peers: set[str], kind: str, what: str,
               lenient: bool = False) -> dict[str, GetResult]:
        """One ``kind`` reply to our own request from each of ``peers``.

        Raises on an ``error`` reply, a peer that leaves, or the timeout. When ``lenient``
        (tearing down), errors and silence are only logged, after STOP_TIMEOUT: a peer that
        is gone stopped its TF processes on its way out, and one that dropped the cluster
        (its lease ran out) refuses, unanswered, a request for a cluster it no longer holds.
        """
        got: dict[str, GetResult] = {}
        deadline = time.monotonic() + (STOP_TIMEOUT if lenient else self.timeout)
        while peers - got.keys():
            missing = peers - got.keys()
            if time.monotonic() > deadline and lenient:
                log.warning("no answer from %s to %s: gone, or it dropped the cluster already",
                            ", ".join(sorted(missing)), what)
                break
            if time.monotonic() > deadline:
                raise JobError(f"no answer from {', '.join(sorted(missing))} to {what} "
                               f"within {self.timeout:.0f}s")
            try:
                reply = results.get(timeout=0.5)
            except queue.Empty:
                gone = missing - {p.name for p in self.client.peers.live()}
                if gone and lenient:
                    log.warning("%s left the swarm; its agent stopped its TF processes on the way",
                                ", ".join(sorted(gone)))
                    peers = peers - gone
                elif gone:
                    raise JobError(f"peer(s) {', '.join(sorted(gone))} left the swarm while waiting "
                                   f"for them to {what}") from None
                continue
            if reply.peer not in peers or reply.re not in self.sent.get(reply.peer, ()):
                log.warning("ignored a %s reply from %s that answers no request of ours",
                            reply.kind, reply.peer)
                continue
            if reply.kind == "error" and not lenient:
                raise TaskFailed(f"{reply.peer} failed to {what}: {reply.error}", peer=reply.peer)
            if reply.kind == "error":
                log.warning("%s failed to %s: %s", reply.peer, what, reply.error)
            if reply.kind in (kind, "error"):
                got.setdefault(reply.peer, reply)
        return got


# -- the chief ----------------------------------------------------------------------------
def run_chief(cluster: TfCluster, command: list[str], node: str, trusted_network: bool) -> int:
    """Run ``command`` as the chief of ``cluster`` and return its exit code.

    It runs in a network namespace of its own with loopback only, where relays carry each
    server task's ClusterSpec address to this node's socket for it, so the chief's own TF
    server (which binds every interface) is on no network. Where no namespace can be made,
    it runs here unisolated only if ``tf.trusted_network`` allows it.
    """
    missing = unanswered(cluster)
    if missing:
        raise JobError(f"TF cluster {cluster.name} is not fully up: {', '.join(missing)} do not answer "
                       f"(see `ipdc tf list`); bring it down and up again")
    problem = isolation_problem()
    if problem and not trusted_network:
        raise JobError(refusal(node, problem))
    plan = cluster.tf_plan
    config = cluster.tf_config()
    maps = [] if problem else [
        {"listen": f"tcp:127.0.0.1:{t.port}", "target": f"unix:{Path(cluster.sockets) / t.sock}"}
        for t in plan.servers()]
    chief = {"label": f"{cluster.name}/chief", "cluster": config["cluster"], "task": config.get("task"),
             "maps": maps}
    launcher = [sys.executable, "-m", "ipdc.runner.tfserver", json.dumps(chief), "--", *command]
    argv = launcher if problem else chief_argv() + launcher
    path = [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(argv, env=env, check=False).returncode
