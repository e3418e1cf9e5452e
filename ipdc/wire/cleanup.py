"""CleanUp: the owner has the result; drop this job's work dir, runners and pins."""

from __future__ import annotations

from dataclasses import dataclass

from ipdc.wire.channel import Channel
from ipdc.wire.ids import JobId


@dataclass(frozen=True)
class CleanUp:
    job_id: JobId
    submitter: str = ""
    sig: str = ""


CLEANUP: Channel[CleanUp] = Channel("cleanup", CleanUp, "ipdc/peer/{node}/cleanup")
