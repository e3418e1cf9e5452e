"""Buffer: a mapper tells a reducer where its share of one map task's output is.

A reducer starts once it holds one Buffer per map task for its partition. Empty
partitions are sent like any other, so a reducer that receives no keys still
finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from channels.base import Channel
from ipdc.ids import Cid, JobId


@dataclass(frozen=True)
class Buffer:
    job_id: JobId
    partition: int
    task: int
    """The map task that produced this partition."""
    cid: Cid


BUFFER: Channel[Buffer] = Channel("buffer", Buffer, "ipdc/peer/{node}/buffer")
