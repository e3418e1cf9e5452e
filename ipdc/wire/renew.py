"""Renew: the job's owner is still there.

A worker drops a job (runners, work dir, pins) whose submitter has said nothing
for its ``agent.job_lease`` (see :class:`~ipdc.wire.presence.Presence`), so a job
whose submitter vanished does not live on every worker forever. A controller sends
Renew to each of its workers well within their lease; any other signed message of
the job renews it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipdc.wire.channel import Channel
from ipdc.wire.ids import JobId


@dataclass(frozen=True)
class Renew:
    job_id: JobId
    submitter: str = ""
    sig: str = ""


RENEW: Channel[Renew] = Channel("renew", Renew, "ipdc/peer/{node}/renew")
