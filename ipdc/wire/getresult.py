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
from ipdc.wire.inline import Inline, check_inline
from ipdc.wire.manifest import MAX_PARTITIONS, MAX_TASKS
from ipdc.wire.schema import in_range

#: Error texts are cut to this many characters before they are sent (a runaway traceback
#: must not fill the broker), and longer ones are refused.
MAX_ERROR = 8192
#: Attempts of one task: far more than any --max-attempts.
MAX_ATTEMPT = 1 << 16

KINDS = ("ready", "map", "reduce", "error", "started", "stopped", "logs")
PHASES = ("", "download", "map", "reduce")


@dataclass(frozen=True)
class GetResult:
    job_id: JobId
    peer: NodeName
    kind: str
    """One of KINDS: ``ready`` after Download, ``map``/``reduce`` after a task, ``error``;
    ``started``/``stopped`` answer the Tf channel's ops; ``logs`` answers Logs."""
    task: int = 0
    attempt: int = 0
    cids: list[Cid] = field(default_factory=list)
    """``map``: one partition CID per reducer; ``reduce``: the part's CID."""
    error: str = ""
    phase: str = ""
    """``error``: what failed ("download", "map" or "reduce")."""
    stats: dict[str, float] = field(default_factory=dict)
    re: str = ""
    """The digest (:func:`ipdc.trust.digest`) of the signed request this answers: the
    submitter acts only on answers to requests it sent that peer."""
    inline: Inline = field(default_factory=dict)
    """The bytes of the small ones among ``cids`` (see :mod:`ipdc.wire.inline`)."""

    def __post_init__(self) -> None:
        check_inline("getresult", self.inline)
        in_range("getresult.task", self.task, 0, MAX_TASKS, MessageError)
        in_range("getresult.attempt", self.attempt, 0, MAX_ATTEMPT, MessageError)
        in_range("getresult.cids", len(self.cids), 0, MAX_PARTITIONS, MessageError)
        in_range("getresult.error", len(self.error), 0, MAX_ERROR, MessageError)
        in_range("getresult.stats", len(self.stats), 0, 32, MessageError)
        in_range("getresult.re", len(self.re), 0, 64, MessageError)
        if self.kind not in KINDS:
            raise MessageError(f"getresult.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.phase not in PHASES:
            raise MessageError(f"getresult.phase: {self.phase!r} is not one of {', '.join(PHASES)}")


GETRESULT: Channel[GetResult] = Channel("getresult", GetResult, "ipdc/result/{node}/{job}")


def clip(text: str, limit: int = MAX_ERROR) -> str:
    """``text`` cut to fit an error field, saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"\n... ({len(text) - limit + 64} more characters cut)"
    return text[:limit - 64] + note
