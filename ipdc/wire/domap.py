"""DoMap: run one map task (one input chunk) of a downloaded job."""

from __future__ import annotations

from dataclasses import dataclass

from ipdc.wire.channel import Channel
from ipdc.wire.ids import JobId


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


DOMAP: Channel[DoMap] = Channel("domap", DoMap, "ipdc/peer/{node}/domap")
