"""Where a Python API task runs: pure functions, tested without a swarm.

Among the live peers that offer what the task asks for (``resources``), the least
loaded ones are taken (tasks this session has in flight there, per slot, plus the
tasks the peer's last heartbeat said it runs), and of those the XOR-nearest to the
task's key (:func:`ipdc.peers.xor_key`, as ``ipdc mr`` chooses workers): any two
submitters spread their tasks the same way, and retries avoid the peers a task
already failed on when there is another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ipdc.errors import NotEnoughPeers
from ipdc.peers import Peer, xor_key

RESOURCES = ("tf", "mem_mb", "cores")


def offers(peer: Peer, resources: Mapping[str, Any]) -> bool:
    """Whether ``peer``'s presence offers every resource asked for."""
    caps = peer.presence.caps
    for name, wanted in resources.items():
        if name == "tf" and bool(wanted) and not caps.tf:
            return False
        if name == "mem_mb" and caps.mem_free_mb < float(wanted):
            return False
        if name == "cores" and caps.cores < float(wanted):
            return False
        if name not in RESOURCES:
            raise NotEnoughPeers(f"unknown resource {name!r}: a task may ask for {', '.join(RESOURCES)}")
    return True


def load_of(peer: Peer, in_flight: int) -> int:
    """How busy ``peer`` is, in whole tasks per slot: peers in the same band are equals."""
    return (in_flight + peer.running) // max(1, peer.presence.slots)


def choose(live: Iterable[Peer], task_key: str, in_flight: Mapping[str, int],
           resources: Mapping[str, Any], avoid: Iterable[str] = ()) -> Peer:
    """The peer to run the task keyed ``task_key``; NotEnoughPeers when none fits."""
    fitting = [p for p in live if offers(p, resources)]
    if not fitting:
        wanted = f" offering {dict(resources)}" if resources else ""
        raise NotEnoughPeers(f"no live peer{wanted} to run a task on: check `ipdc peers`")
    avoided = set(avoid)
    fresh = [p for p in fitting if p.name not in avoided] or fitting
    least = min(load_of(p, in_flight.get(p.name, 0)) for p in fresh)
    target = xor_key(task_key)
    return min((p for p in fresh if load_of(p, in_flight.get(p.name, 0)) == least),
               key=lambda p: p.point ^ target)
