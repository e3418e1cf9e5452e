"""Inline payloads (ipdc/wire/inline.py, ipdc/submit/inline.py) without a swarm: what goes
inline, what a receiver refuses, and the bounds a decoded message is held to."""

from __future__ import annotations

import base64

import pytest

from ipdc.config import config_from_dict
from ipdc.errors import ConfigError, MessageError
from ipdc.kubo import EMPTY_CID
from ipdc.submit.inline import Payloads
from ipdc.wire.buffer import BUFFER, Buffer
from ipdc.wire.domap import DOMAP, DoMap
from ipdc.wire.getresult import GETRESULT, GetResult
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.inline import (
    INLINE_BUDGET,
    INLINE_LIMIT,
    INLINE_MAX,
    InlineMismatch,
    pack,
    threshold,
    unpack,
)
from ipdc.wire.unixfs import cid_of

JOB = JobId("0123456789abcdef0123456789abcdef")


def named(data: bytes) -> tuple[str, bytes]:
    return cid_of(data), data


@pytest.mark.parametrize("size", [INLINE_MAX - 1, INLINE_MAX, INLINE_MAX + 1])
def test_a_payload_goes_inline_up_to_the_threshold_and_round_trips(size: int) -> None:
    cid, data = named(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    inline = pack([(cid, data)], INLINE_MAX)
    if size <= INLINE_MAX:
        assert unpack(inline, "worker n-1") == {cid: data}
    else:
        assert inline == {}


def test_the_empty_payload_and_what_passes_the_budget_go_by_cid() -> None:
    docs = [named(b""), *(named(bytes([i]) * INLINE_MAX) for i in range(5))]
    inline = pack(docs, INLINE_MAX)
    assert EMPTY_CID not in inline
    assert len(inline) == INLINE_BUDGET // INLINE_MAX  # the rest would overflow one message
    assert sum(len(base64.b64decode(t)) for t in inline.values()) <= INLINE_BUDGET


@pytest.mark.parametrize("forge", ["other bytes", "one byte more", "not base64", "nothing"])
def test_bytes_that_are_not_their_cid_refuse_the_message_naming_cid_and_sender(forge: str) -> None:
    cid, data = named(b"the real chunk\n")
    text = {"other bytes": base64.b64encode(b"the evil chunk\n").decode(),
            "one byte more": base64.b64encode(data + b"!").decode(),
            "not base64": "%%%%", "nothing": ""}[forge]
    with pytest.raises(InlineMismatch) as caught:
        unpack({Cid(cid): text}, "submitter ed25519:abc in domap 0")
    assert cid in str(caught.value) and "submitter ed25519:abc" in str(caught.value)
    assert isinstance(caught.value, MessageError)  # the agent's reader drops it and goes on


def test_decoders_bound_what_a_message_carries_inline() -> None:
    cid, data = named(b"x" * (INLINE_LIMIT + 3))  # base64 of INLINE_LIMIT + 1 is as long as of INLINE_LIMIT
    oversized = {cid: base64.b64encode(data).decode()}
    for channel, message in ((DOMAP, DoMap(JOB, 0)), (BUFFER, Buffer(JOB, 0, 0, Cid(cid)))):
        payload = channel.encode(message).replace(b'"inline":{}', b'"inline":' + repr(oversized)
                                                  .replace("'", '"').encode())
        with pytest.raises(MessageError, match="inline"):
            channel.decode(payload)
    fine = GetResult(JOB, NodeName("n-1"), "map", cids=[Cid(cid_of(b"a"))], inline=pack([named(b"a")], 10))
    assert GETRESULT.decode(GETRESULT.encode(fine)) == fine


@pytest.mark.parametrize("value", [-1, INLINE_LIMIT + 1, "128", True])
def test_a_bad_threshold_is_refused_in_the_manifest_and_the_config(value: object) -> None:
    with pytest.raises(MessageError, match="inline_max"):
        threshold({"inline_max": value})
    with pytest.raises(ConfigError, match=r"agent\.inline_max"):
        config_from_dict({"agent": {"inline_max": value}})


def test_a_manifest_without_a_threshold_sends_everything_through_ipfs() -> None:
    assert threshold({}) == 0
    assert config_from_dict({}).agent.inline_max == INLINE_MAX


def test_the_submitter_counts_each_path_and_relays_only_checked_outputs() -> None:
    payloads = Payloads(INLINE_MAX)
    small, big = named(b"small chunk\n"), named(b"y" * (INLINE_MAX + 1))
    docs = [(cid, len(data), lambda data=data: data) for cid, data in (small, big)]
    docs.append((EMPTY_CID, 0, lambda: b""))
    assert set(payloads.outgoing("chunks", docs)) == {small[0]}
    out = named(b"map output")
    payloads.take(GetResult(JOB, NodeName("n-1"), "map", cids=[Cid(out[0]), Cid(EMPTY_CID), Cid(big[0])],
                            inline=pack([out], INLINE_MAX)))
    assert unpack(payloads.relay(out[0]), "controller") == {out[0]: out[1]}
    assert payloads.relay(big[0]) == {}
    assert payloads.counts == {"chunks_inline": 1, "chunks_ipfs": 1, "outputs_inline": 1, "outputs_ipfs": 1}
    lie = GetResult(JOB, NodeName("n-2"), "reduce", cids=[Cid(cid_of(b"part"))],
                    inline={Cid(cid_of(b"part")): base64.b64encode(b"another part").decode()})
    with pytest.raises(InlineMismatch, match="worker n-2"):
        payloads.take(lie)
    assert payloads.part(cid_of(b"part")) is None  # nothing of a refused report is held


def test_a_changed_file_goes_by_cid() -> None:
    """A chunk whose file changed since it was added is not sent as other bytes under its CID."""
    cid, _ = named(b"what was added\n")
    assert Payloads(INLINE_MAX).outgoing("chunks", [(cid, 15, lambda: b"what is there!\n")]) == {}
