"""DoMap: run one map task (one input chunk) of a downloaded job."""

from __future__ import annotations

from dataclasses import dataclass, field

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.getresult import MAX_ATTEMPT
from ipdc.wire.ids import JobId
from ipdc.wire.inline import Inline, check_inline
from ipdc.wire.manifest import MAX_TASKS
from ipdc.wire.schema import in_range


@dataclass(frozen=True)
class DoMap:
    job_id: JobId
    task: int
    """Index into the manifest's ``chunks``."""
    attempt: int = 0
    """Counts from 0; a task retried after a failure or a lost worker gets the next number,
    and only the result of the current attempt is taken."""
    submitter: str = ""
    sig: str = ""
    """Ed25519 signature by ``submitter``, the key that signed the job's manifest."""
    inline: Inline = field(default_factory=dict)
    """The chunk's bytes, when it is small (see :mod:`ipdc.wire.inline`)."""

    def __post_init__(self) -> None:
        check_inline("domap", self.inline)
        in_range("domap.task", self.task, 0, MAX_TASKS, MessageError)
        in_range("domap.attempt", self.attempt, 0, MAX_ATTEMPT, MessageError)


DOMAP: Channel[DoMap] = Channel("domap", DoMap, "ipdc/peer/{node}/domap")
