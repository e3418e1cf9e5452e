"""Tf: the owner of a TF cluster asks one agent to start or stop its part of it.

A TF cluster is a job of kind ``tf``. Its Download carries no code, only data: the
cluster's :class:`TfPlan` as the manifest's ``params`` (which node hosts which task,
and each node's kubo peer ID), signed like every manifest. Each agent derives all
the rest from the plan itself, the same way on every host:

* every task's TF address is a fixed loopback address (:meth:`TfPlan.cluster_spec`),
  the same in every task's network namespace, so nothing is reserved on any host;
* every server task is reached through a unix socket named after its position,
  ``t<k>.sock``, in the cluster's directory on each host (:func:`cluster_dir`): there,
  it is the task's own serving socket when the task runs on that host, or kubo's
  ``p2p forward`` to the host that runs it, under the protocol :meth:`TfPlan.protocol`.

Ops, each answered on GetResult (topic ``ipdc/result/<node>/<cluster_id>``), echoing
the request's digest in ``re``:

    start   forward to the tasks hosted elsewhere, start this    -> "started", once every
            node's servers (needs the cluster's Download first)     server here answers
    stop    stop the servers, close the forwards and listeners,  -> "stopped"
            remove the sockets

A failure answers "error". Both ops are idempotent, since QoS 1 may deliver twice.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import JobId, NodeName
from ipdc.wire.schema import build, in_range

OPS = ("start", "stop")
#: A TF job name as it appears in the ClusterSpec: also part of device names and log files.
TASK_TYPE = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: A kubo peer ID as kubo prints it: base58btc multihash (Qm..., 12D3Koo...) or a base32 CIDv1.
PEER_ID = re.compile(r"(Qm|12D3Koo)[1-9A-HJ-NP-Za-km-z]{40,60}|b[a-z2-7]{50,70}")
#: More tasks than this in one cluster is not a real request.
MAX_TASKS = 64
#: Jobs whose one task is the user's own script (the coordinator), never a server.
COORDINATOR_JOBS = ("chief",)
#: Task ``k`` of a cluster (in :meth:`TfPlan.task_list` order) listens on 127.0.0.1:base_port + k in
#: its own network namespace, and every other task reaches it at that address in theirs. The base
#: differs between clusters (:func:`base_port`): a host that cannot isolate its TF servers
#: (``tf.trusted_network``) runs them all in one network namespace.
PORTS = range(10000, 60000, MAX_TASKS)
#: The protocols of TF streams on the libp2p swarm: ``/x/ipdc-tf/<cluster token>/t<k>``.
PROTOCOL_PREFIX = "/x/ipdc-tf/"
#: A unix socket path is limited to 108 bytes by the kernel (sun_path).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Tf:
    op: str
    """One of OPS."""
    cluster_id: JobId
    """The cluster's id: also the job id of its Download and of the replies' topic."""
    submitter: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise MessageError(f"tf.op: {self.op!r} is not one of {', '.join(OPS)}")


@dataclass(frozen=True)
class Task:
    """One task of the cluster: ``/job:<job>/task:<index>``, at position ``k`` of the plan."""

    job: str
    index: int
    k: int
    host: NodeName
    port: int

    @property
    def name(self) -> str:
        return f"{self.job}-{self.index}"

    @property
    def sock(self) -> str:
        """The file name of the unix socket that reaches this task on every cluster host."""
        return f"t{self.k}.sock"

    @property
    def server(self) -> bool:
        """False for the coordinator: the user's script, which nothing ever dials."""
        return self.job not in COORDINATOR_JOBS


@dataclass(frozen=True)
class TfPlan:
    """A TF cluster as its manifest carries it: pure data, checked field by field."""

    name: str
    tasks: dict[str, list[NodeName]]
    """Job -> the node that hosts each of its tasks, by index. The chief's node is the owner's:
    the user's script runs there, through ``ipdc tf run``."""
    peers: dict[NodeName, str]
    """Every node of the cluster -> its kubo peer ID. Only these peers may open a stream to
    a task, and the owner is always one of them (the chief's forwards live on its kubo)."""
    base_port: int
    """Task ``k`` listens on 127.0.0.1:base_port + k."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", self.name):
            raise MessageError(f"tf plan name: {self.name[:70]!r} is not a cluster name")
        in_range("tf plan tasks", sum(len(h) for h in self.tasks.values()), 1, MAX_TASKS, MessageError)
        in_range("tf plan peers", len(self.peers), 1, MAX_TASKS + 1, MessageError)
        for job, hosts in self.tasks.items():
            if not TASK_TYPE.fullmatch(job):
                raise MessageError(f"tf plan: {job[:40]!r} is not a TF job name")
            if not hosts or (job in COORDINATOR_JOBS and len(hosts) != 1):
                raise MessageError(f"tf plan: job {job!r} has {len(hosts)} tasks")
            for host in hosts:
                if host not in self.peers:
                    raise MessageError(f"tf plan: {job!r} is placed on {host}, which has no peer ID")
        for node, peer in self.peers.items():
            NodeName(node)
            if not PEER_ID.fullmatch(peer):
                raise MessageError(f"tf plan: {peer[:70]!r} (of {node}) is not a kubo peer ID")
        if len(set(self.peers.values())) != len(self.peers):
            raise MessageError("tf plan: two nodes claim one peer ID")
        if self.base_port not in PORTS:
            raise MessageError(f"tf plan: base port {self.base_port} is not one of {PORTS}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TfPlan:
        """The plan in a TF manifest's params; MessageError names what is wrong."""
        return build(cls, params, "tf plan", MessageError)

    def to_params(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": {j: [str(h) for h in hs] for j, hs in self.tasks.items()},
                "peers": {str(n): p for n, p in self.peers.items()}, "base_port": self.base_port}

    def task_list(self) -> list[Task]:
        """Every task, jobs by name and indices ascending: a task's position ``k`` fixes its port
        and socket name, so every host computes the same from the same plan."""
        ordered = [(job, i, host) for job in sorted(self.tasks) for i, host in enumerate(self.tasks[job])]
        return [Task(job, i, k, host, self.base_port + k) for k, (job, i, host) in enumerate(ordered)]

    def servers(self) -> list[Task]:
        return [t for t in self.task_list() if t.server]

    def cluster_spec(self) -> dict[str, list[str]]:
        """The ClusterSpec every task sees: loopback addresses in its own network namespace."""
        spec: dict[str, list[str]] = {}
        for t in self.task_list():
            spec.setdefault(t.job, []).append(f"127.0.0.1:{t.port}")
        return spec

    @property
    def hosts(self) -> list[str]:
        return sorted(self.peers)


def cluster_token(submitter: str, cluster_id: str) -> str:
    """A short name for one submitter's cluster: two submitters may use one cluster id, and
    socket paths must stay short."""
    return hashlib.sha256(f"{submitter}/{cluster_id}".encode()).hexdigest()[:12]


def base_port(token: str) -> int:
    """The first port of a cluster's block, spread over PORTS by its token."""
    return PORTS[int(token, 16) % len(PORTS)]


def protocol(token: str, task: Task) -> str:
    """The libp2p protocol that carries streams to ``task``: its host listens on it, and every
    other host of the cluster forwards a unix socket to it."""
    return f"{PROTOCOL_PREFIX}{token}/t{task.k}"


def socket_root(home: Path) -> Path:
    """Where the node at ``home`` keeps its TF clusters' sockets.

    The sandboxes of a root agent run under uids of their own, which must pass every
    directory on the way, and a home may be closed to them (``/root/.ipdc``): a root node
    keeps them under ``/run/ipdc/`` instead, in directories others may pass but not list.
    The sandboxes of any other agent share its uid, and its home serves."""
    if os.geteuid() == 0:
        return Path("/run/ipdc") / hashlib.sha256(str(home).encode()).hexdigest()[:12] / "tf"
    return home / "run" / "tf"


def cluster_dir(home: Path, token: str) -> Path:
    """Where a host keeps one cluster's sockets (``t<k>.sock``)."""
    return socket_root(home) / token


TF: Channel[Tf] = Channel("tf", Tf, "ipdc/peer/{node}/tf")
