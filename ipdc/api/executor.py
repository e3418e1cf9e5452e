"""``Swarm.executor()``: a :class:`concurrent.futures.Executor` for code that expects one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from ipdc.api.future import Future

if TYPE_CHECKING:
    from ipdc.api.swarm import Swarm


class SwarmExecutor(Executor):
    """Submits to a :class:`Swarm`; shutting it down cancels what it submitted and leaves
    the swarm session open (its owner closes it)."""

    def __init__(self, swarm: Swarm) -> None:
        self._swarm = swarm
        self._futures: list[Future] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future = self._swarm.submit(fn, *args, **kwargs)
        self._futures = [f for f in self._futures if not f.done()] + [future]
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """As :meth:`Executor.map`; one iterable goes ``chunksize`` items per task."""
        if len(iterables) == 1:
            return self._swarm.map(fn, iterables[0], chunksize=chunksize, timeout=timeout)
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pending = [f for f in self._futures if not f.done()]
        if cancel_futures:
            for future in pending:
                future.cancel()
        elif wait:
            for future in pending:
                future.exception()
