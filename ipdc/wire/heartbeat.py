"""Heartbeat: a node's periodic proof of life and its current load.

A controller takes a node as dead when no heartbeat came for ``agent.peer_timeout``,
even if the broker has not yet fired the node's last will (half-open TCP).
"""

from __future__ import annotations

from dataclasses import dataclass

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import NodeName
from ipdc.wire.schema import in_range


@dataclass(frozen=True)
class Heartbeat:
    name: NodeName
    ts: float
    load: float
    running: int

    def __post_init__(self) -> None:
        in_range("heartbeat.load", self.load, 0, 1e6, MessageError)
        in_range("heartbeat.running", self.running, 0, 1 << 20, MessageError)


HEARTBEAT: Channel[Heartbeat] = Channel("heartbeat", Heartbeat, "ipdc/heartbeat/{node}")
