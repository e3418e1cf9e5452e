"""What every channel shares: a topic pattern, a message dataclass, and strict
JSON (de)serialisation.

Payloads are data, and any member of the swarm can publish them. ``decode``
accepts a payload only if it is small, valid JSON, nested no deeper than
``MAX_DEPTH``, free of NaN and Infinity and of integers too long to be real, and
matches the message's fields and types exactly. Anything else raises
:class:`~ipdc.errors.MessageError` and nothing else: a reader logs it and goes on,
so one hostile message cannot stop a thread.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ipdc.errors import MessageError
from ipdc.wire.schema import build

M = TypeVar("M")

#: The broker's ``max_packet_size``: it disconnects a client that sends a larger packet.
MAX_PACKET = 1 << 20
#: Larger payloads are refused: only CIDs and small metadata travel on MQTT. This leaves
#: room under MAX_PACKET for the topic and MQTT's own headers.
MAX_PAYLOAD = MAX_PACKET - (16 << 10)
#: Lists and objects nested deeper than this are refused (IPDC's own messages nest 4 deep).
MAX_DEPTH = 16
#: Digits of the longest integer accepted: 64-bit values and no more.
MAX_INT_DIGITS = 19


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is not allowed")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _depth(value: Any, limit: int) -> None:
    """Raise ValueError when ``value`` nests deeper than ``limit``."""
    if isinstance(value, (list, dict)):
        if limit <= 0:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        for item in (value.values() if isinstance(value, dict) else value):
            _depth(item, limit - 1)


def parse_json(payload: bytes, what: str) -> Any:
    """Strict JSON from an untrusted peer; MessageError for anything else."""
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"{what}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        data = json.loads(payload, parse_constant=_reject_constant, parse_int=_parse_int,
                          parse_float=_parse_float)
        _depth(data, MAX_DEPTH)
    except RecursionError:
        raise MessageError(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise MessageError(f"{what}: not acceptable JSON ({exc})") from None
    return data


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
        return json.dumps(dataclasses.asdict(message), separators=(",", ":"),  # type: ignore[call-overload]
                          allow_nan=False).encode()

    def decode(self, payload: bytes) -> M:
        data = parse_json(payload, self.name)
        try:
            return build(self.message, data, self.name, MessageError)
        except MessageError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:  # a field's own check, phrased by Python
            raise MessageError(f"{self.name}: {exc}") from None
