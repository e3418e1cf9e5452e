"""Small payloads that travel inside a message, next to their CID.

A tiny job's input chunk, code, map outputs and parts are a few KB each: moving each
through kubo costs an add on one node and a bitswap fetch on another, milliseconds
apiece, where the bytes themselves fit in the message that names them. So a payload
of at most the job's ``inline_max`` bytes (``agent.inline_max`` of the submitting node,
128 KiB by default: Rain keeps objects under 128 KiB in its scheduler's memory, Ray
keeps small objects in-process) is carried as ``inline[cid] = base64(bytes)`` in the
message that names the CID.

Identity stays content-addressed: the CID is still computed, carried and recorded, and
every receiver computes the CID of the bytes it was handed
(:func:`ipdc.wire.unixfs.verify`, kubo's own algorithm) and refuses the message when
they differ, naming the CID and the sender (:class:`InlineMismatch`). Whatever must
still be in IPFS (code, inputs, outputs, the result directory) is added there as well,
off the critical path; larger payloads move through IPFS alone.

One message carries at most ``INLINE_BUDGET`` bytes inline (before base64), so with its
CIDs it stays well under the broker's ``max_packet_size`` (1 MiB); what does not fit goes
by CID.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

from ipdc.errors import MessageError
from ipdc.wire.ids import Cid
from ipdc.wire.schema import in_range
from ipdc.wire.unixfs import UnsupportedCid, cid_of, verify

#: The default threshold (``agent.inline_max``): payloads of at most this many bytes go inline.
INLINE_MAX = 128 << 10
#: The largest threshold a job may ask for.
INLINE_LIMIT = 256 << 10
#: Bytes carried inline by one message, all payloads together, before base64 (which adds a third).
INLINE_BUDGET = 512 << 10
#: Base64 text of that many bytes: a received message holding more is refused.
_TEXT_BUDGET = 4 * ((INLINE_BUDGET + 2) // 3)
_TEXT_LIMIT = 4 * ((INLINE_LIMIT + 2) // 3)

Inline = dict[Cid, str]
"""A message's inline payloads: CID -> base64 (RFC 4648, padded) of its bytes."""


class InlineMismatch(MessageError):
    """Bytes carried inline are not the bytes their CID names: a corrupt or forged message."""


def threshold(params: Mapping[str, Any]) -> int:
    """The inline threshold a job's manifest asks for (0: none, every payload through IPFS).

    A manifest from a submitter that predates inline payloads says nothing, and gets 0."""
    value = params.get("inline_max", 0)
    if type(value) is not int or not 0 <= value <= INLINE_LIMIT:
        raise MessageError(f"manifest.params.inline_max: {value!r} is not a number of bytes from 0 to "
                           f"{INLINE_LIMIT}")
    return value


def check_inline(where: str, inline: Mapping[Cid, str]) -> None:
    """A decoded message's inline payloads are within bounds (their bytes are checked on use)."""
    in_range(f"{where}.inline", sum(len(text) for text in inline.values()), 0, _TEXT_BUDGET, MessageError)
    for text in inline.values():
        in_range(f"{where}.inline entry", len(text), 0, _TEXT_LIMIT, MessageError)


def pack(documents: Iterable[tuple[str, bytes]], limit: int) -> Inline:
    """The payloads among ``documents`` (CID, bytes) that go inline: non-empty, at most ``limit``
    bytes each, in order while the message's budget lasts. The empty payload never goes
    inline: its CID is known to every node and needs no bytes."""
    inline: Inline = {}
    budget = INLINE_BUDGET
    for cid, data in documents:
        if 0 < len(data) <= min(limit, budget) and cid not in inline:
            inline[Cid(cid)] = base64.b64encode(data).decode("ascii")
            budget -= len(data)
    return inline


def unpack(inline: Mapping[Cid, str], sender: str) -> dict[str, bytes]:
    """The bytes of every inline payload, each checked against its CID.

    Raises :class:`InlineMismatch`, naming the CID and ``sender``, for bytes that are not
    what their CID names: the whole message is then refused, never partly used."""
    payloads: dict[str, bytes] = {}
    for cid, text in inline.items():
        try:
            data = base64.b64decode(text, validate=True)
            good = len(data) > 0 and verify(data, cid)
        except (binascii.Error, ValueError, UnsupportedCid):
            good, data = False, b""
        if not good:
            got = cid_of(data) if data else "nothing decodable"
            raise InlineMismatch(f"{sender} sent {len(data)} bytes inline for {cid}, but they are not that "
                                 f"CID's bytes (they hash to {got}): the message is refused")
        payloads[str(cid)] = data
    return payloads
