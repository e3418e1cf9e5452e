"""Presence: a retained message per node, cleared by the node's last will.

A subscriber to ``ipdc/presence/+`` therefore sees every live node at once, and
sees a node vanish when its connection dies without a clean goodbye.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipdc.wire.channel import Channel
from ipdc.wire.ids import NodeName


@dataclass(frozen=True)
class Capabilities:
    cores: int
    mem_free_mb: int
    tf: bool
    """True when TensorFlow imports on this node: only such nodes host TF tasks."""


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
    extra: dict[str, str] = field(default_factory=dict)


PRESENCE: Channel[Presence] = Channel("presence", Presence, "ipdc/presence/{node}", retain=True)
