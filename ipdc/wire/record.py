"""JobRecord: a finished job's result, retained on the broker for every node to find.

``ipdc job get ID`` works on any node of the swarm, not only the one that ran the
job, so the result CID must be findable without asking that node (it may be
asleep; its kubo may still serve the blocks, or another peer's may). The
submitting node publishes one small retained message per succeeded job on
``ipdc/result/<owner>/<job>/record``:

* retained, so a node that asks later (or joins later) gets it at once, with no
  index service to run: the broker already persists retained messages;
* under the owner's own result topic, which the broker ACL lets only that node
  write (``ipdc/result/%u/#``), so no member can publish a record in another's name;
* signed by the job's submitter key for channel ``record`` and recipient ``swarm``,
  and accepted only when that key is one the reading node trusts: a trusted key
  is one whose jobs this node would run anyway, so its result CIDs are as
  trustworthy as its code. An untrusted member cannot make ``get`` write its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import KINDS, MAX_PARTITIONS
from ipdc.wire.schema import in_range

#: The recipient a record is signed for: every node of the swarm.
SWARM = "swarm"


@dataclass(frozen=True)
class JobRecord:
    job_id: JobId
    owner: NodeName
    kind: str
    result_cid: Cid
    """A UnixFS directory of the job's output files (``part-NNNNN``)."""
    parts: int
    submitted_at: float
    finished_at: float
    submitter: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MessageError(f"record.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        in_range("record.parts", self.parts, 0, MAX_PARTITIONS, MessageError)


RECORD: Channel[JobRecord] = Channel("record", JobRecord, "ipdc/result/{node}/{job}/record", retain=True)
