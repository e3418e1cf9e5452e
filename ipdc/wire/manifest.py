"""The job manifest: everything a worker needs to take part in one job.

It names code and input only by CID, so it stays small enough for MQTT. It is
signed by its submitter for one recipient (see ipdc.trust), so it is also what an
agent checks before it runs anything of the job: the key must be trusted, the
manifest fresh and unseen, and the agent itself listed among its workers.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ipdc.errors import MessageError
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.schema import in_range

KINDS = ("mapreduce", "tf")
#: More map tasks or reducers than this is not a real job.
MAX_TASKS = 1 << 16
MAX_PARTITIONS = 4096
#: File names a manifest may give code files: no directories, no dot files.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


#: Longest input file path a chunk may carry (Linux's PATH_MAX).
MAX_PATH = 4096


@dataclass(frozen=True)
class ChunkSource:
    """Where one map task's chunk comes from, beyond its CID."""

    path: str
    """The input file it is part of, relative to the input (``docs/a.txt``): map's second
    argument, as Hadoop's ``map.input.file``."""
    offset: int = 0
    length: int | None = None
    """None: the task's CID is the chunk itself. A number: the chunk is ``length`` bytes from
    ``offset`` of the task's CID, a file of an input given by CID, which is never added again."""

    def __post_init__(self) -> None:
        in_range("source.path", len(self.path), 0, MAX_PATH, MessageError)
        in_range("source.offset", self.offset, 0, 1 << 62, MessageError)
        if self.length is not None:
            in_range("source.length", self.length, 0, 1 << 62, MessageError)


@dataclass(frozen=True)
class JobManifest:
    job_id: JobId
    owner: NodeName
    """The submitting node; results go to whoever subscribes to the job's result topics."""
    code: dict[str, Cid]
    """File name in the job's work dir -> CID, e.g. ``{"Map.py": ..., "Reduce.py": ...}``."""
    chunks: list[Cid]
    """Input chunks: map task ``i`` reads ``chunks[i]``."""
    partitions: int
    """Reduce partitions (the job's K). Which worker reduces which partition is decided
    by the submitter with Buffer messages, and may change when workers are lost."""
    workers: list[NodeName]
    """The peers asked to take part when this copy was issued: an agent not listed
    refuses it, so a manifest sent to one peer cannot be replayed to another."""
    submitter: str = ""
    """The Ed25519 key (``ed25519:...``) that signs this job's messages; agents run the job
    only if it is in their trusted-submitters list."""
    kind: str = "mapreduce"
    params: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    """With ``nonce``, what makes a captured manifest useless later: agents take a nonce
    once, and only within ``agent.manifest_ttl`` of this time."""
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    sources: list[ChunkSource] = field(default_factory=list)
    """One per chunk, or none (an input of one local file whose map takes no path)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MessageError(f"manifest.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        in_range("manifest.partitions", self.partitions, 0, MAX_PARTITIONS, MessageError)
        in_range("manifest.chunks", len(self.chunks), 0, MAX_TASKS, MessageError)
        in_range("manifest.workers", len(self.workers), 0, MAX_PARTITIONS, MessageError)
        if self.sources and len(self.sources) != len(self.chunks):
            raise MessageError(f"manifest.sources: {len(self.sources)} for {len(self.chunks)} chunks")

    def source(self, task: int) -> ChunkSource | None:
        """Where map task ``task``'s chunk comes from; None: its CID is the chunk."""
        return self.sources[task] if self.sources else None

    def uploaded(self) -> list[Cid]:
        """What the submitter added to kubo for this job (and unpins after it): the code and
        the chunks it cut, never the files of an input given by CID."""
        chunks = [c for i, c in enumerate(self.chunks)
                  if self.sources == [] or self.sources[i].length is None]
        return [*self.code.values(), *chunks]

    def reissued(self, workers: list[NodeName]) -> JobManifest:
        """The same job with a fresh time and nonce and the current workers, for a peer
        that joins it late or must be asked again."""
        return replace(self, workers=list(workers), submitted_at=time.time(), nonce=secrets.token_hex(16))
