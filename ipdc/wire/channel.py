"""What every channel shares: a topic pattern, a message dataclass, and strict
JSON (de)serialisation.

Payloads are data. ``decode`` accepts a payload only if it is small, valid JSON,
and matches the message's fields and types exactly; anything else raises
:class:`~ipdc.errors.MessageError`, which the agent logs before dropping it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Generic, TypeVar

from ipdc.errors import MessageError
from ipdc.wire.schema import build

M = TypeVar("M")

#: Larger payloads are refused: only CIDs and small metadata travel on MQTT.
MAX_PAYLOAD = 1 << 20


@dataclass(frozen=True)
class Channel(Generic[M]):
    name: str
    message: type[M]
    pattern: str
    """Topic with ``{placeholders}``, e.g. ``ipdc/peer/{node}/domap``."""
    retain: bool = False

    def topic(self, **parts: str) -> str:
        return self.pattern.format(**parts)

    def subscription(self, **parts: str) -> str:
        """The topic filter, with ``+`` for every placeholder not given."""
        names = [seg[1:-1] for seg in self.pattern.split("/") if seg.startswith("{")]
        return self.pattern.format(**{n: parts.get(n, "+") for n in names})

    def encode(self, message: M) -> bytes:
        return json.dumps(dataclasses.asdict(message), separators=(",", ":")).encode()  # type: ignore[call-overload]

    def decode(self, payload: bytes) -> M:
        if len(payload) > MAX_PAYLOAD:
            raise MessageError(f"{self.name}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MessageError(f"{self.name}: payload is not JSON ({exc})") from None
        return build(self.message, data, self.name, MessageError)
