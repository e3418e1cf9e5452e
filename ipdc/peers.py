"""Peers and how a job chooses among them.

Worker choice is Kademlia-style: the distance between a peer and a job is

    distance(peer, key) = int(sha256(peer_id)) XOR int(sha256(key))

with both hashes read as 256-bit big-endian integers, and the K peers with the
smallest distance win. Any node computes the same choice from the same live set,
and different jobs spread over different peers.
"""

from __future__ import annotations

import hashlib
import heapq
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from channels.heartbeat import Heartbeat
from channels.presence import Presence


def xor_key(text: str) -> int:
    """The 256-bit point of ``text`` (a peer ID or a job key) in the XOR space."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


@dataclass
class Peer:
    """A live node, as last announced on presence and heartbeat."""

    presence: Presence
    last_seen: float = field(default_factory=time.monotonic)
    load: float = 0.0
    running: int = 0
    point: int = 0

    def __post_init__(self) -> None:
        self.point = xor_key(self.presence.peer_id)
        self.load = self.presence.load

    @property
    def name(self) -> str:
        return self.presence.name

    @property
    def peer_id(self) -> str:
        return self.presence.peer_id

    def age(self, now: float | None = None) -> float:
        """Seconds since we last heard from this peer."""
        return (now if now is not None else time.monotonic()) - self.last_seen


def select_nearest(
    peers: Iterable[Peer], key: str, k: int, eligible: Callable[[Peer], bool] | None = None
) -> list[Peer]:
    """The ``k`` eligible peers nearest ``key`` by XOR distance, nearest first.

    Returns fewer than ``k`` when fewer are eligible; the caller decides whether
    that is an error.
    """
    target = xor_key(key)
    pool = peers if eligible is None else (p for p in peers if eligible(p))
    return heapq.nsmallest(k, pool, key=lambda p: p.point ^ target)


def assign_nearest(
    peers: Iterable[Peer], key: str, tasks: int, capacity: Callable[[Peer], int],
    eligible: Callable[[Peer], bool] | None = None,
) -> list[Peer]:
    """A peer for each of ``tasks`` tasks: one task per peer while peers last.

    Task ``i`` goes to the ``i``-th nearest eligible peer to ``key``; when there are
    fewer peers than tasks, the next round starts again from the nearest, skipping
    peers that already hold ``capacity(peer)`` tasks. Returns fewer than ``tasks``
    peers when capacity runs out; the caller decides whether that is an error.
    """
    pool = list(peers)
    order = select_nearest(pool, key, len(pool), eligible)
    room = {p.name: max(0, capacity(p)) for p in order}
    chosen: list[Peer] = []
    while len(chosen) < tasks and any(room.values()):
        for peer in order:
            if len(chosen) < tasks and room[peer.name] > 0:
                room[peer.name] -= 1
                chosen.append(peer)
    return chosen


class PeerTable:
    """The live set of peers, fed by presence and heartbeat messages.

    A retained empty presence (a last will, or a clean goodbye) removes a peer at
    once; silence longer than ``timeout`` removes it at the next read.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()

    def update_presence(self, name: str, presence: Presence | None, age: float = 0.0) -> None:
        """``age``: how old the news is (a retained message is as old as its timestamp)."""
        with self._lock:
            if presence is None:
                self._peers.pop(name, None)
            else:
                self._peers[name] = Peer(presence, last_seen=time.monotonic() - age)

    def update_heartbeat(self, beat: Heartbeat, age: float = 0.0) -> None:
        with self._lock:
            peer = self._peers.get(beat.name)
            if peer is not None:
                peer.last_seen = max(peer.last_seen, time.monotonic() - age)
                peer.load = beat.load
                peer.running = beat.running

    def live(self) -> list[Peer]:
        now = time.monotonic()
        with self._lock:
            return [p for p in self._peers.values() if p.age(now) <= self.timeout]
