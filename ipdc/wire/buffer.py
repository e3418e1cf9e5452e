"""Buffer: the job's owner tells a reducer where one map task's share of its
partition is.

The owner sends it once it has taken the map task's result, so a reducer only
ever sees output of accepted attempts. A reducer starts once it holds one Buffer
per map task for its (partition, attempt). When a reducer is lost, or a mapper
whose output it still needed, the owner sends the whole set again under the
partition's next attempt, to the same or another peer. Empty partitions are sent
like any other, so a reducer that receives no keys still finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.getresult import MAX_ATTEMPT
from ipdc.wire.ids import Cid, JobId
from ipdc.wire.inline import Inline, check_inline
from ipdc.wire.manifest import MAX_PARTITIONS, MAX_TASKS
from ipdc.wire.schema import in_range


@dataclass(frozen=True)
class Buffer:
    job_id: JobId
    partition: int
    task: int
    """The map task that produced this partition."""
    cid: Cid
    attempt: int = 0
    """The reduce attempt of ``partition`` this Buffer belongs to."""
    submitter: str = ""
    sig: str = ""
    inline: Inline = field(default_factory=dict)
    """The map output's bytes, when it is small (see :mod:`ipdc.wire.inline`)."""

    def __post_init__(self) -> None:
        check_inline("buffer", self.inline)
        in_range("buffer.partition", self.partition, 0, MAX_PARTITIONS, MessageError)
        in_range("buffer.task", self.task, 0, MAX_TASKS, MessageError)
        in_range("buffer.attempt", self.attempt, 0, MAX_ATTEMPT, MessageError)


BUFFER: Channel[Buffer] = Channel("buffer", Buffer, "ipdc/peer/{node}/buffer")
