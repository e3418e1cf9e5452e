"""GetResult: a worker reports to the job's owner.

Each worker publishes on its own result topic (``ipdc/result/<worker>/<job>``), so
a broker ACL can keep nodes from speaking for one another; the owner subscribes to
``ipdc/result/+/<job>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import Cid, JobId, NodeName

KINDS = ("ready", "map", "reduce", "error", "port", "started", "stopped")
PHASES = ("", "download", "map", "reduce")


@dataclass(frozen=True)
class GetResult:
    job_id: JobId
    peer: NodeName
    kind: str
    """One of KINDS: ``ready`` after Download, ``map``/``reduce`` after a task, ``error``;
    ``port``/``started``/``stopped`` answer the Tf channel's ops."""
    task: int = 0
    attempt: int = 0
    cids: list[Cid] = field(default_factory=list)
    """``map``: one partition CID per reducer; ``reduce``: the part's CID."""
    error: str = ""
    phase: str = ""
    """``error``: what failed ("download", "map" or "reduce")."""
    stats: dict[str, float] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    """``port``: the TCP ports the agent reserved for the cluster's tasks."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MessageError(f"getresult.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.phase not in PHASES:
            raise MessageError(f"getresult.phase: {self.phase!r} is not one of {', '.join(PHASES)}")


GETRESULT: Channel[GetResult] = Channel("getresult", GetResult, "ipdc/result/{node}/{job}")
