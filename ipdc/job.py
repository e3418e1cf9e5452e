"""The job manifest: everything a worker needs to take part in one job.

It names code and input only by CID, so it stays small enough for MQTT, and it
fixes the job's plan (which node reduces which partition) so that every worker
routes map output the same way.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ipdc.ids import Cid, JobId, NodeName


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
    """Partition ``p`` of every map output goes to ``reducers[p]``."""
    kind: str = "mapreduce"
    params: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def partitions(self) -> int:
        return len(self.reducers)
