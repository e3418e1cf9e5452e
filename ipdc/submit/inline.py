"""The submitter's side of inline payloads (see :mod:`ipdc.wire.inline`) for one job.

It decides which outgoing payloads ride in their message, checks and holds the small
outputs workers report inline (so a reducer is sent its map outputs, and the job's
parts are written, without a kubo round trip), and counts which path each payload
took: ``job.json``'s ``transport`` says how many chunks, code files, map outputs and
parts moved inline and how many through IPFS.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from ipdc.kubo import EMPTY_CID
from ipdc.wire.getresult import GetResult
from ipdc.wire.inline import Inline, pack, unpack
from ipdc.wire.unixfs import verify

#: Bytes of reported outputs one job holds in memory; past it, further outputs are passed
#: on by CID (their workers added them to kubo too), so a job of many small partitions
#: cannot fill the controller's memory.
HOLD_BYTES = 64 << 20


class Payloads:
    """One job's inline payloads, as its controller sees them."""

    def __init__(self, limit: int) -> None:
        """``limit``: the job's threshold (0: everything through IPFS)."""
        self.limit = limit
        self.held: dict[str, bytes] = {}
        self.held_bytes = 0
        self.counts: Counter[str] = Counter()
        """``<what>_inline`` and ``<what>_ipfs`` for code, chunks, outputs and parts."""

    def outgoing(self, what: str, documents: Sequence[tuple[str, int, Callable[[], bytes]]]) -> Inline:
        """The inline field of a message that names ``documents`` (CID, size, how to read its
        bytes): the small ones are read and carried, the others go by CID alone. Bytes that
        are no longer their CID's (a file changed since it was added) go by CID too: kubo
        holds what was added."""
        small = [(cid, read()) for cid, size, read in documents
                 if cid != EMPTY_CID and 0 < size <= self.limit]
        inline = pack([(cid, data) for cid, data in small if verify(data, cid)], self.limit)
        for cid, _, _ in documents:
            if cid != EMPTY_CID:
                self.counts[f"{what}_{'inline' if cid in inline else 'ipfs'}"] += 1
        return inline

    def take(self, result: GetResult) -> None:
        """Check and hold the payloads a worker's report carries for its own CIDs.

        Raises :class:`~ipdc.wire.inline.InlineMismatch` (naming the CID and the worker) when
        any of them is not its CID's bytes: the report is then a failed attempt."""
        payloads = unpack(result.inline, f"worker {result.peer}")
        for cid in result.cids:
            if cid == EMPTY_CID:
                continue
            data = payloads.get(cid)
            if result.kind == "map":
                self.counts[f"outputs_{'ipfs' if data is None else 'inline'}"] += 1
            if data is not None and cid not in self.held and self.held_bytes + len(data) <= HOLD_BYTES:
                self.held[cid] = data
                self.held_bytes += len(data)

    def relay(self, cid: str) -> Inline:
        """The inline field of a Buffer naming map output ``cid``: its bytes when its worker
        reported them inline, else nothing (the reducer fetches it by CID)."""
        data = self.held.get(cid)
        return {} if data is None else pack([(cid, data)], len(data))

    def part(self, cid: str) -> bytes | None:
        """The bytes of a part, when its reducer reported them inline (None: fetch it by CID)."""
        data = self.held.get(cid)
        if cid != EMPTY_CID:
            self.counts[f"parts_{'ipfs' if data is None else 'inline'}"] += 1
        return data
