"""Peers and how a job chooses among them.

Worker choice is Kademlia-style: the distance between a peer and a job is

    distance(peer, key) = int(sha256(peer_id)) XOR int(sha256(key))

with both hashes read as 256-bit big-endian integers, and the K peers with the
smallest distance win. Any node computes the same choice from the same live set,
and different jobs spread over different peers.

Why the live set is kept sorted by point: a job must choose among 100k peers in
well under 10 ms, and a scan of every peer in Python costs about that much. The
peers whose points share the longest prefix with the job's point are exactly the
nearest ones, and in a sorted list every prefix is one contiguous block, found
by bisection. So :meth:`PeerTable.live` keeps a sorted snapshot, rebuilt only
when the live set changes, and :func:`select_nearest` looks only inside the
smallest block that holds K candidates.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NoReturn

from ipdc.wire.heartbeat import Heartbeat
from ipdc.wire.presence import Presence

log = logging.getLogger(__name__)

#: Bits of a point: sha256.
POINT_BITS = 256
#: Pending changes to the sorted index beyond which one full sort is cheaper than
#: inserting each (an insert moves half the list; a sort of 100k points takes ~26 ms,
#: ~2000 inserts into a 100k list). Filling the table at connect time takes this path.
FULL_REBUILD_CHANGES = 1024
#: Buckets per timeout when the table files live peers by when it last heard from them.
#: Finer buckets cost a bucket move on more heartbeats; coarser ones make a read look
#: at more live peers in the bucket that holds a newly silent one.
SILENCE_BUCKETS = 8


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


def peer_rows(live: Iterable[Peer]) -> list[dict[str, Any]]:
    """What ``ipdc peers`` and the dashboard show of each live peer, by name."""
    return [{"name": p.name, "peer_id": p.peer_id, "host": p.presence.host, "addrs": list(p.presence.addrs),
             "cores": p.presence.caps.cores, "mem_free_mb": p.presence.caps.mem_free_mb,
             "tf": p.presence.caps.tf, "slots": p.presence.slots, "load": round(p.load, 2),
             "running": p.running, "last_seen_s": round(p.age(), 1)}
            for p in sorted(live, key=lambda p: p.name)]


_point = attrgetter("point")


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError("a live-peer snapshot is shared and cannot change; copy it with list(...)")


class LivePeers(list[Peer]):
    """The live peers at one moment, sorted by point: what :meth:`PeerTable.live` returns.

    It is a list, so callers use it as one, but a read-only one: the table hands
    the same snapshot to every caller until the live set changes, and the sorted
    points it carries for :func:`select_nearest` must stay in step with it.
    """

    __slots__ = ("_points",)

    append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only

    def __init__(self, peers: list[Peer], points: list[int]) -> None:
        super().__init__(peers)
        self._points = list(points)

    def nearest(self, target: int, k: int, eligible: Callable[[Peer], bool] | None = None) -> list[Peer]:
        """The ``k`` eligible peers nearest ``target``, as a full sort by distance would give.

        Every peer that shares the first ``L`` bits of ``target`` is nearer than every
        peer that does not (their distances are below and at least ``2**(256-L)``). So
        the ``k`` nearest all lie in the longest such prefix block holding ``k``
        eligible peers; the block is widened a bit at a time until it does.
        Equal points (two nodes with one peer ID) keep their order in this list, as
        the stable sort of the brute-force choice does.
        """
        if k <= 0:
            return []
        points = self._points
        # the longest prefix of the target shared by at least k peers (eligible or not)
        shortest, longest = 0, POINT_BITS
        while shortest < longest:
            bits = (shortest + longest + 1) // 2
            lo, hi = _block(points, target, bits)
            if hi - lo >= k:
                shortest = bits
            else:
                longest = bits - 1
        bits = shortest
        while True:
            lo, hi = _block(points, target, bits)
            block = self[lo:hi]
            if eligible is not None:
                block = [p for p in block if eligible(p)]
            if len(block) >= k or bits == 0:
                return sorted(block, key=lambda p: p.point ^ target)[:k]
            bits -= 1


def _block(points: list[int], target: int, bits: int) -> tuple[int, int]:
    """Index range of the sorted ``points`` whose first ``bits`` bits equal ``target``'s."""
    shift = POINT_BITS - bits
    base = (target >> shift) << shift
    return bisect_left(points, base), bisect_left(points, base + (1 << shift))


def select_nearest(
    peers: Iterable[Peer], key: str, k: int, eligible: Callable[[Peer], bool] | None = None
) -> list[Peer]:
    """The ``k`` eligible peers nearest ``key`` by XOR distance, nearest first.

    Returns fewer than ``k`` when fewer are eligible; the caller decides whether
    that is an error. A :class:`LivePeers` snapshot is searched through its sorted
    index; any other iterable is scanned.
    """
    target = xor_key(key)
    if isinstance(peers, LivePeers):
        return peers.nearest(target, k, eligible)
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

    Peers without capacity never get a task, so only the ``tasks`` nearest peers
    with capacity are ordered: with enough of them, the first round is the answer.
    """
    def usable(peer: Peer) -> bool:
        return (eligible is None or eligible(peer)) and capacity(peer) > 0

    order = select_nearest(peers, key, tasks, usable)
    if len(order) == tasks:
        return order
    room = {p.name: capacity(p) for p in order}
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
    once; silence longer than ``timeout`` removes it at the next read, and a
    heartbeat after that brings it back.

    Reads stay cheap with 100k peers, because nothing on the read path looks at
    every peer: :meth:`live` returns one cached :class:`LivePeers` snapshot until
    the live set changes; the table keeps the live peers sorted by point (changes
    wait for the next read, then go in one by one or by one sort), and files them
    by when they were last heard from in buckets of ``timeout / SILENCE_BUCKETS``
    seconds, so a read looks only at the peers in buckets old enough to hold a
    silent one.
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: monotonic seconds; tests pass a fake one instead of sleeping."""
        self.timeout = timeout
        self._clock = clock
        self._tick = timeout / SILENCE_BUCKETS
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()
        self._silent: set[str] = set()
        """Known peers silent past the timeout when last looked at: not in the index."""
        self._heard: dict[int, set[str]] = {}
        self._bucket: dict[str, int] = {}
        """Peers in the index by ``int(last_seen // tick)``, and each one's bucket."""
        self._order: list[Peer] = []
        self._points: list[int] = []
        """The index: live peers sorted by point, as of the last read, and their points."""
        self._changes: list[tuple[Peer, bool]] = []
        """Index changes since the last read, in order: (peer, True) adds, (peer, False) drops."""
        self._snapshot: LivePeers | None = LivePeers([], [])

    # -- feeding ---------------------------------------------------------------------
    def update_presence(self, name: str, presence: Presence | None, age: float = 0.0) -> None:
        """``age``: how old the news is (a retained message is as old as its timestamp).

        Old news never makes a known peer older: the broker sends every retained
        presence again when we resubscribe after a reconnect, and a node that
        announced itself an hour ago and beat a second ago was heard a second ago.
        """
        now = self._clock()
        with self._lock:
            old = self._peers.pop(name, None) if presence is None else self._peers.get(name)
            if old is not None and name not in self._silent:
                self._change(old, False)
                self._unfile(name)
            self._silent.discard(name)
            if presence is not None:
                heard = now - age if old is None else max(old.last_seen, now - age)
                peer = Peer(presence, last_seen=heard)
                self._peers[name] = peer
                self._admit(name, peer, now)

    def update_heartbeat(self, beat: Heartbeat, age: float = 0.0) -> None:
        now = self._clock()
        with self._lock:
            peer = self._peers.get(beat.name)
            if peer is not None:
                peer.last_seen = max(peer.last_seen, now - age)
                peer.load = beat.load
                peer.running = beat.running
                if beat.name in self._silent:
                    self._silent.discard(beat.name)
                    self._admit(beat.name, peer, now)
                else:
                    self._file(beat.name, peer)

    def refresh_all(self) -> None:
        """Take every known peer as heard from now.

        For a submitter whose broker connection came back after an outage: the
        heartbeats it missed were not the peers' silence, so no peer should count
        as dead for the outage's length. A peer that was already silent before the
        outage comes back too (the table cannot tell it apart) and drops out again
        after ``timeout`` without a heartbeat.
        """
        now = self._clock()
        with self._lock:
            for peer in self._peers.values():
                peer.last_seen = now
            for name in self._silent:
                self._change(self._peers[name], True)
            self._silent.clear()
            bucket = int(now // self._tick)
            self._heard = {bucket: set(self._peers)} if self._peers else {}
            self._bucket = dict.fromkeys(self._peers, bucket)
        log.debug("refreshed %d peers", len(self._peers))

    # -- reading ---------------------------------------------------------------------
    def live(self) -> LivePeers:
        """Every peer heard from within ``timeout``, sorted by point (read-only, shared)."""
        now = self._clock()
        with self._lock:
            self._drop_silent(now)
            if self._snapshot is None:
                self._apply_changes()
                self._snapshot = LivePeers(self._order, self._points)
            return self._snapshot

    def is_live(self, name: str) -> bool:
        """Whether ``name`` is known and was heard from within ``timeout``."""
        now = self._clock()
        with self._lock:
            peer = self._peers.get(name)
            return peer is not None and now - peer.last_seen <= self.timeout

    # -- bookkeeping (callers hold the lock; peers go by the name the table knows them by,
    # -- the one in their presence topic, whatever their payload says) -----------------
    def _admit(self, name: str, peer: Peer, now: float) -> None:
        """Index a known peer if it is live, else remember it as silent."""
        if now - peer.last_seen > self.timeout:
            self._silent.add(name)
        else:
            self._change(peer, True)
            self._file(name, peer)

    def _change(self, peer: Peer, add: bool) -> None:
        self._changes.append((peer, add))
        self._snapshot = None

    def _file(self, name: str, peer: Peer) -> None:
        """Put an indexed peer in the bucket of its ``last_seen``."""
        bucket = int(peer.last_seen // self._tick)
        if self._bucket.get(name) != bucket:
            self._unfile(name)
            self._heard.setdefault(bucket, set()).add(name)
            self._bucket[name] = bucket

    def _unfile(self, name: str) -> None:
        bucket = self._bucket.pop(name, None)
        if bucket is not None:
            names = self._heard[bucket]
            names.discard(name)
            if not names:
                del self._heard[bucket]

    def _drop_silent(self, now: float) -> None:
        """Move peers silent past the timeout out of the index.

        A peer in bucket ``b`` was heard from after ``(b - 1) * tick`` (a whole tick
        of slack against rounding), so only older buckets can hold a silent peer;
        normally there are none, as live peers keep moving to new buckets.
        """
        for bucket in [b for b in self._heard if now - (b - 1) * self._tick > self.timeout]:
            for name in [n for n in self._heard[bucket] if now - self._peers[n].last_seen > self.timeout]:
                self._silent.add(name)
                self._unfile(name)
                self._change(self._peers[name], False)

    def _apply_changes(self) -> None:
        """Bring the sorted index in step with the changes since the last read."""
        if len(self._changes) > FULL_REBUILD_CHANGES:
            self._order = sorted((p for n, p in self._peers.items() if n not in self._silent), key=_point)
            self._points = [p.point for p in self._order]
        else:
            order, points = self._order, self._points
            for peer, add in self._changes:
                if add:
                    i = bisect_right(points, peer.point)
                    order.insert(i, peer)
                    points.insert(i, peer.point)
                else:
                    i = bisect_left(points, peer.point)
                    while order[i] is not peer:  # past other nodes with the same peer ID
                        i += 1
                    del order[i], points[i]
        self._changes.clear()
