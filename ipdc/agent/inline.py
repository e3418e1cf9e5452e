"""The agent's side of inline payloads (see :mod:`ipdc.wire.inline`).

Received payloads: a Download's code, a DoMap's chunk and a Buffer's map output may carry
their bytes. The agent checks them against their CIDs when the message arrives (a
mismatch refuses the whole message, unanswered, like a bad signature) and keeps them
here, per job, until the job is dropped; a task then takes its inputs from here before
it asks kubo.

Produced payloads: a task's small outputs are named by their locally computed CID and
reported inline at once; they are added to kubo afterwards, on one background thread,
so they are in IPFS as before (a resumed controller, a replacement reducer, or ``ipdc job
get`` may fetch them by CID), and a job's drop waits for its adds before it unpins.
"""

from __future__ import annotations

import io
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ipdc.kubo import EMPTY_CID, KuboClient
from ipdc.wire.ids import Cid
from ipdc.wire.inline import Inline, pack
from ipdc.wire.unixfs import cid_of

log = logging.getLogger(__name__)

#: How long a job's drop waits for its outputs' background adds before it unpins anyway.
SETTLE_TIMEOUT = 60.0


class Received:
    """Payloads that came inline, checked, by job (the job's work dir name)."""

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, job: str, payloads: dict[str, bytes]) -> None:
        if payloads:
            with self._lock:
                self._jobs.setdefault(job, {}).update(payloads)

    def get(self, job: str, cid: str) -> bytes | None:
        with self._lock:
            return self._jobs.get(job, {}).get(cid)

    def drop(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)


class Produced:
    """Outputs reported inline, added to kubo in the background."""

    def __init__(self, kubo: KuboClient) -> None:
        self.kubo = kubo
        self._adder = ThreadPoolExecutor(1, thread_name_prefix="add-inline")
        self._pending: dict[str, list[Future[None]]] = {}
        self._lock = threading.Lock()

    def store(self, job: str, documents: list[bytes], limit: int) -> tuple[list[Cid], Inline]:
        """The CIDs of a task's outputs, and the inline field that carries the small ones.

        Small ones are named locally and added to kubo after the report; the others are added
        now, in one request; an empty one is the empty CID without a request (each added
        file costs kubo a few ms of pinning)."""
        named = [Cid(cid_of(d)) if 0 < len(d) <= limit else None for d in documents]
        inline = pack([(c, d) for c, d in zip(named, documents, strict=True) if c is not None], limit)
        late = [(c, d) for c, d in zip(named, documents, strict=True) if c is not None and c in inline]
        now = [d for c, d in zip(named, documents, strict=True) if d and (c is None or c not in inline)]
        added = iter(self.kubo.add_streams([(f"out-{i}", io.BytesIO(d)) for i, d in enumerate(now)]))
        cids = [Cid(EMPTY_CID) if not d else c if c is not None and c in inline else next(added)
                for c, d in zip(named, documents, strict=True)]
        if late:
            future = self._adder.submit(self._add_late, late)
            with self._lock:
                self._pending.setdefault(job, []).append(future)
        return cids, inline

    def _add_late(self, documents: list[tuple[Cid, bytes]]) -> None:
        try:
            added = self.kubo.add_streams([(f"out-{i}", io.BytesIO(d)) for i, (_, d) in enumerate(documents)])
        except Exception:  # the report is out: a missing copy in kubo is worth a log line, not a crash
            log.exception("could not add %d inline output(s) to kubo", len(documents))
            return
        for (cid, _), got in zip(documents, added, strict=True):
            if got != cid:
                log.error("kubo names an inline output %s, not %s: its import settings differ from IPDC's",
                          got, cid)

    def settle(self, job: str) -> None:
        """Wait until the job's outputs are in kubo (before they are unpinned)."""
        with self._lock:
            futures = self._pending.pop(job, [])
        for future in futures:
            try:
                future.result(timeout=SETTLE_TIMEOUT)
            except TimeoutError:
                log.warning("job %s: an inline output is still being added to kubo after %g s",
                            job, SETTLE_TIMEOUT)

    def close(self) -> None:
        self._adder.shutdown(wait=False, cancel_futures=True)

