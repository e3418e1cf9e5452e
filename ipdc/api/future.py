"""The Python API's Future: a :class:`concurrent.futures.Future` of one task.

A result that a worker kept in its kubo (too large to send inline) stays there until
:meth:`Future.result` is called: a future passed to another task is fetched by that
task's worker, worker to worker, and never by the submitter unless it asks.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ipdc.wire.ids import Cid


@dataclass(frozen=True)
class Stored:
    """A task's encoded result as its worker reported it: inline bytes, or a CID."""

    codec: str
    data: bytes | None
    cid: Cid | None
    trusted: bool
    """The worker's node key is trusted here: a pickle from it may be unpickled."""
    peer: str = ""
    """The worker that holds it."""
    value: Any = None
    """The value itself, for a call that ran here (``codec`` is :data:`HERE`)."""


#: The codec of a result computed in this process: no bytes, the value itself.
HERE = "here"


class Future(concurrent.futures.Future[Any]):
    """One task's outcome; also an argument to another task (a task graph edge)."""

    def __init__(self, task_id: str, materialize: Callable[[Stored], Any],
                 cancel_remote: Callable[[Future], None]) -> None:
        super().__init__()
        self.task_id = task_id
        self.peers: list[str] = []
        """Every peer the task was sent to, in order; the last one runs it now."""
        self._materialize = materialize
        self._cancel_remote = cancel_remote
        self._value: tuple[Any] | None = None

    @property
    def peer(self) -> str:
        return self.peers[-1] if self.peers else ""

    def stored(self) -> Stored:
        """The encoded result, without fetching it (for a dependent task's arguments)."""
        value = super().result(0)
        assert isinstance(value, Stored)
        return value

    def result(self, timeout: float | None = None) -> Any:
        """The task's value (fetched and decoded on the first call), or its exception."""
        stored = super().result(timeout)
        if self._value is None:
            self._value = (self._materialize(stored),)
        return self._value[0]

    def cancel(self) -> bool:
        """Stop the task, queued or running (its worker kills its runner)."""
        if self.done():
            return False
        self._cancel_remote(self)
        return super().cancel()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<ipdc.Future task {self.task_id[:8]} on {self.peer or '-'} {state}>"


def as_completed(futures: Iterable[concurrent.futures.Future[Any]],
                 timeout: float | None = None) -> Iterator[concurrent.futures.Future[Any]]:
    """The futures as they finish, as :func:`concurrent.futures.as_completed` gives them."""
    return concurrent.futures.as_completed(futures, timeout)
