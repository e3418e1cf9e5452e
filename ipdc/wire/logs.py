"""Logs: the job's submitter asks a worker for its log lines of one job.

The worker answers on ``ipdc/result/<worker>/<job>/logs`` (its own result topic,
so the ACL vouches for who answers) with a GetResult of kind ``logs`` whose one
CID names the lines, added to the worker's kubo: log text can be far larger than
an MQTT message, and the CID lets the submitter fetch it from wherever it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipdc.wire.channel import Channel
from ipdc.wire.getresult import GetResult
from ipdc.wire.ids import JobId


@dataclass(frozen=True)
class Logs:
    job_id: JobId
    submitter: str = ""
    sig: str = ""
    """Ed25519 signature by ``submitter``, which must be the job's own submitter."""


LOGS: Channel[Logs] = Channel("logs", Logs, "ipdc/peer/{node}/logs")
LOGS_REPLY: Channel[GetResult] = Channel("getresult", GetResult, "ipdc/result/{node}/{job}/logs")
