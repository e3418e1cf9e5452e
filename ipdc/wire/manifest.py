"""The job manifest: everything a worker needs to take part in one job.

It names code and input only by CID, so it stays small enough for MQTT. It is
signed by its submitter (see ipdc.trust), so it is also what an agent checks before
it runs anything of the job.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ipdc.wire.ids import Cid, JobId, NodeName


@dataclass(frozen=True)
class JobManifest:
    job_id: JobId
    owner: NodeName
    """The submitting node; results go to whoever subscribes to the job's result topics."""
    code: dict[str, Cid]
    """File name in the job's work dir -> CID, e.g. ``{"Map.py": ..., "Reduce.py": ...}``."""
    chunks: list[Cid]
    """Input chunks: map task ``i`` reads ``chunks[i]``."""
    reducers: list[NodeName]
    """The first plan: partition ``p`` is reduced by ``reducers[p]``. Its length is the
    number of partitions; when a reducer is lost, the submitter moves its partition
    elsewhere with Buffer messages, and this list is not updated."""
    submitter: str = ""
    """The Ed25519 key (``ed25519:...``) that signs this job's messages; agents run the job
    only if it is in their trusted-submitters list."""
    kind: str = "mapreduce"
    params: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    """With ``nonce``, what makes a captured manifest useless later: agents take a nonce
    once, and only within ``agent.manifest_ttl`` of this time."""
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    def reissued(self) -> "JobManifest":
        """The same job with a fresh time and nonce, for a peer that joins it late."""
        return replace(self, submitted_at=time.time(), nonce=secrets.token_hex(16))

    @property
    def partitions(self) -> int:
        return len(self.reducers)
