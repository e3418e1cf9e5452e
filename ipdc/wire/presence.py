"""Presence: a retained message per node, cleared by the node's last will.

A subscriber to ``ipdc/presence/+`` therefore sees every live node at once, and
sees a node vanish when its connection dies without a clean goodbye.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import NodeName
from ipdc.wire.schema import in_range


@dataclass(frozen=True)
class Capabilities:
    cores: int
    mem_free_mb: int
    tf: bool
    """True when TensorFlow imports on this node: only such nodes host TF tasks."""

    def __post_init__(self) -> None:
        in_range("presence.caps.cores", self.cores, 0, 1 << 16, MessageError)
        in_range("presence.caps.mem_free_mb", self.mem_free_mb, 0, 1 << 40, MessageError)


@dataclass(frozen=True)
class Presence:
    name: NodeName
    peer_id: str
    """The node's kubo peer ID: the XOR distance used to choose workers is between these."""
    host: str
    addrs: list[str]
    caps: Capabilities
    slots: int
    load: float
    ts: float
    version: str = ""
    lease: float = 120.0
    """``agent.job_lease``: this node drops a job whose submitter has said nothing for this
    long, so a submitter renews its jobs well within it."""
    instance: str = ""
    """Which home on which machine runs this node (a hash): two homes that claim one
    identity are told apart, and the second refuses to start."""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        in_range("presence.addrs", len(self.addrs), 0, 64, MessageError)
        in_range("presence.slots", self.slots, 0, 1 << 16, MessageError)
        in_range("presence.load", self.load, 0, 1e6, MessageError)
        in_range("presence.lease", self.lease, 1, 1e7, MessageError)
        in_range("presence.extra", len(self.extra), 0, 64, MessageError)


PRESENCE: Channel[Presence] = Channel("presence", Presence, "ipdc/presence/{node}", retain=True)
