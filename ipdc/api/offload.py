"""Where :meth:`ipdc.api.Swarm.offload` runs a call: the cost model, pure and tested alone.

As the DecisionEngine of task-offloading systems does, it estimates the time to
completion here and on each candidate peer, and picks the cheapest:

* here: ``run × (1 + load here)``, where ``run`` is the function's measured run time
  (per function CID) and the load is this node's busy slots per slot;
* on a peer: ``rtt + (argument bytes + result bytes) / bandwidth + run × (1 + its load)``,
  with the measured round-trip overhead of a task to that peer and the measured
  bandwidth of transfers from it.

Measurements are exponentially weighted means (:class:`Measured`). A function never
measured counts as taking no time, so its first call runs here, where it is measured;
a peer never measured counts with :data:`ASSUMED_RTT` and :data:`ASSUMED_BANDWIDTH`,
and the record says which figures were assumed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ipdc.errors import JobError

POLICIES = ("auto", "local", "remote")
LOCAL = "local"
#: Before any task to a peer was timed: a round trip through the broker and a runner.
ASSUMED_RTT = 0.01
#: Before any transfer from a peer was timed: bytes per second.
ASSUMED_BANDWIDTH = 50e6
#: Weight of the newest sample in a measured mean.
WEIGHT = 0.3


@dataclass
class Measured:
    """An exponentially weighted mean; ``None`` until the first sample."""

    value: float | None = None
    samples: int = 0

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - WEIGHT) * self.value + WEIGHT * sample
        self.samples += 1

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@dataclass(frozen=True)
class Estimate:
    """The expected seconds to have the result, at one place."""

    where: str
    """``local``, or a peer's name."""
    run: float
    wait: float
    """The extra time of the place's load: ``run × load``."""
    transfer: float
    """Round trip and bytes moved (0 here)."""
    assumed: tuple[str, ...] = ()
    """The figures not yet measured, for which defaults were used."""

    @property
    def total(self) -> float:
        return self.run + self.wait + self.transfer


@dataclass(frozen=True)
class Candidate:
    """A live peer as the model sees it."""

    name: str
    load: float
    """Busy slots per slot (its heartbeat's running tasks, and ours in flight there)."""
    rtt: float | None
    bandwidth: float | None


@dataclass(frozen=True)
class Decision:
    function: str
    """The function's CID."""
    policy: str
    choice: str
    estimates: list[Estimate]
    arg_bytes: int
    result_bytes: int
    decided_at: float
    outcome: dict[str, Any] = field(default_factory=dict)
    """Filled in when the call ends: measured ``seconds``, and ``error`` when it failed."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for estimate, source in zip(data["estimates"], self.estimates, strict=True):
            estimate["total"] = source.total
        return data


def local_estimate(run: float | None, load: float) -> Estimate:
    seconds = run or 0.0
    return Estimate(LOCAL, seconds, seconds * load, 0.0, () if run is not None else ("run",))


def remote_estimate(peer: Candidate, run: float | None, arg_bytes: int, result_bytes: int) -> Estimate:
    seconds = run or 0.0
    assumed = tuple(name for name, value in (("run", run), ("rtt", peer.rtt), ("bandwidth", peer.bandwidth))
                    if value is None)
    rtt = peer.rtt if peer.rtt is not None else ASSUMED_RTT
    bandwidth = peer.bandwidth if peer.bandwidth is not None else ASSUMED_BANDWIDTH
    transfer = rtt + (arg_bytes + result_bytes) / bandwidth
    return Estimate(peer.name, seconds, seconds * peer.load, transfer, assumed)


def decide(policy: str, run: float | None, local_load: float, peers: Iterable[Candidate],
           arg_bytes: int, result_bytes: int) -> tuple[str, list[Estimate]]:
    """The place to run (``local`` or a peer's name) and every estimate made."""
    if policy not in POLICIES:
        raise JobError(f"unknown offload policy {policy!r}: use one of {', '.join(POLICIES)}")
    estimates = [local_estimate(run, local_load)]
    estimates += [remote_estimate(p, run, arg_bytes, result_bytes) for p in peers]
    if policy == LOCAL:
        return LOCAL, estimates
    remote = [e for e in estimates if e.where != LOCAL]
    if policy == "remote":
        if not remote:
            raise JobError("offload(policy='remote'): no live peer besides this node")
        return min(remote, key=lambda e: e.total).where, estimates
    return min(estimates, key=lambda e: e.total).where, estimates
