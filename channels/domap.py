"""DoMap: run one map task (one input chunk) of a downloaded job."""

from __future__ import annotations

from dataclasses import dataclass

from channels.base import Channel
from ipdc.ids import JobId


@dataclass(frozen=True)
class DoMap:
    job_id: JobId
    task: int
    """Index into the manifest's ``chunks``."""
    attempt: int = 0


DOMAP: Channel[DoMap] = Channel("domap", DoMap, "ipdc/peer/{node}/domap")
