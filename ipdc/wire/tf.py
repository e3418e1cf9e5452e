"""Tf: the controller of a TF cluster asks one agent to act for it.

Ops, each answered on GetResult (topic ``ipdc/result/<node>/<cluster_id>``):

    port    reserve ``count`` free TCP ports     -> kind "port", ``ports``
    start   run a TF server for each of ``tasks`` -> kind "started" once every
            (needs the cluster's Download first)     server's port answers
    stop    SIGTERM (then SIGKILL) every server   -> kind "stopped"
            of the cluster, release its ports

A failure answers kind "error". Each op is idempotent, since QoS 1 may deliver
twice: a second ``port`` returns the same ports, a second ``start`` does not start
a task that already runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import JobId

OPS = ("port", "start", "stop")
#: The files a TF cluster's Download carries, by name in the job's work dir.
SPEC_FILE = "ClusterSpec.json"
WORKER_FILE = "create_worker.py"
#: A TF job name as it appears in ClusterSpec.json: also part of device names and log files.
TASK_TYPE = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: More tasks than this on one agent is not a real request.
MAX_TASKS = 64


@dataclass(frozen=True)
class TfTask:
    """One task of the cluster: ``/job:<job>/task:<index>``."""

    job: str
    index: int

    def __post_init__(self) -> None:
        if not TASK_TYPE.fullmatch(self.job):
            raise MessageError(f"tf.tasks.job: {self.job[:40]!r} is not a TF job name")
        if not 0 <= self.index < MAX_TASKS:
            raise MessageError(f"tf.tasks.index: {self.index} is out of range")


@dataclass(frozen=True)
class Tf:
    op: str
    """One of OPS."""
    cluster_id: JobId
    """The cluster's id: also the job id of its Download and of the replies' topic."""
    count: int = 0
    """``port``: how many ports to reserve."""
    tasks: list[TfTask] = field(default_factory=list)
    """``start``: the tasks this agent serves, as named in ClusterSpec.json."""
    submitter: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise MessageError(f"tf.op: {self.op!r} is not one of {', '.join(OPS)}")
        if not 0 <= self.count <= MAX_TASKS or len(self.tasks) > MAX_TASKS:
            raise MessageError(f"tf: at most {MAX_TASKS} ports or tasks per agent")


TF: Channel[Tf] = Channel("tf", Tf, "ipdc/peer/{node}/tf")
