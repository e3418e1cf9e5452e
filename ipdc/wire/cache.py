"""CacheRecord: "this job was computed, and here is its result", shared by the swarm.

A job's **cache key** names everything that decides its result's bytes: the CIDs of
every file it ships (Map.py, Reduce.py, ``--file``s), what runs each stage (a Python
file, or a streaming command line), the CID of its whole input and, for an input of
one file, that file's name (which ``map(line, path)`` and a streaming mapper's
``mapreduce_map_input_file`` receive, and a file's CID does not cover; a directory's
CID covers its names), K (the number of parts), the partitioner, the requested
number of chunks, and ``--verify``. The output directory, the time, the job id and
the workers are left out: two jobs with the same key write the same parts.
The key is the SHA-256 of a canonical encoding (sorted JSON, ASCII, no spaces) of a
versioned dict, so every node computes the same key for the same job.

A submitter that computed a job publishes one small retained message on
``ipdc/cache/<key>/<its node>``:

* retained, so any node finds it later at once (the broker persists retained
  messages), with no index service to run;
* under the publisher's own sub-topic, which the broker ACL lets only that node write
  (``ipdc/cache/+/%u``), so no member can replace another member's record for a key;
* signed by the job's submitter key for channel ``cache`` and recipient ``swarm``, and
  used only when that key is one the reading node trusts (see
  :mod:`ipdc.control.cache`). The signature covers the key, so a record cannot be
  moved under another key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import Cid, JobId, NodeName

#: The partitioner every reducer's keys come from (:func:`ipdc.wire.partition.stable_partition`):
#: part of the key, so a change to it can never serve results cut another way.
PARTITIONER = "crc32-utf8-mod-k/1"
#: What the key's encoding looks like; bump it when the key's contents change.
KEY_VERSION = 2
#: A record is a few hundred bytes; anything larger on a cache topic is refused unread.
MAX_RECORD = 4096
_KEY = re.compile(r"[0-9a-f]{64}")


def cache_key(*, code: Mapping[str, str], stages: Mapping[str, Any], input_cid: str, input_name: str, k: int,
              chunks: int | None, verify: int, majority: bool) -> str:
    """The cache key of a job: SHA-256 (hex) of its canonical encoding. ``code``: shipped file
    name -> CID; ``stages``: the manifest's ``params["stages"]`` (JSON data); ``input_name``:
    the path map receives when the input is one file, else ""."""
    fields = {"v": KEY_VERSION, "code": dict(code), "stages": dict(stages), "input": input_cid,
              "input_name": input_name, "k": k,
              "partitioner": PARTITIONER, "chunks": chunks, "verify": verify, "majority": majority}
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode()).hexdigest()


@dataclass(frozen=True)
class CacheRecord:
    key: str
    result_cid: Cid
    """A UnixFS directory of the job's parts (``part-NNNNN``)."""
    job_id: JobId
    """The job that computed it."""
    owner: NodeName
    """Its submitting node, whose sub-topic holds the record."""
    created: float
    submitter: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        if not _KEY.fullmatch(self.key):
            raise MessageError(f"cache.key: not a SHA-256 in hex: {self.key[:80]!r}")


CACHE: Channel[CacheRecord] = Channel("cache", CacheRecord, "ipdc/cache/{key}/{node}", retain=True)
