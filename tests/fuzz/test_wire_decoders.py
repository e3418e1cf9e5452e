"""Every channel's decoder against what a hostile member could publish (Hypothesis).

Whatever the bytes, ``decode`` either returns a well-typed message or raises
MessageError: never another exception, which would kill the thread that reads the
broker. Three sources of input per channel: random bytes, random JSON documents
(deep, wide, huge integers, NaN and Infinity spelled as JSON allows them), and
valid messages with one field replaced or one key added.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipdc.errors import MessageError
from ipdc.trust import Signer
from ipdc.wire.buffer import Buffer
from ipdc.wire.cache import CACHE, CacheRecord
from ipdc.wire.channel import MAX_DEPTH, Channel
from ipdc.wire.cleanup import CleanUp
from ipdc.wire.domap import DoMap
from ipdc.wire.download import Download
from ipdc.wire.getresult import GETRESULT, GetResult
from ipdc.wire.heartbeat import HEARTBEAT, Heartbeat
from ipdc.wire.ids import JobId, NodeName
from ipdc.wire.inbox import INBOX_CHANNELS
from ipdc.wire.logs import Logs
from ipdc.wire.manifest import ChunkSource, JobManifest
from ipdc.wire.presence import PRESENCE, Capabilities, Presence
from ipdc.wire.record import RECORD, SWARM, JobRecord
from ipdc.wire.renew import Renew
from ipdc.wire.stages import CommandStage, stages_of
from ipdc.wire.task import TASK_REPLY, Task, TaskArg, TaskReply
from ipdc.wire.tf import Tf
from ipdc.wire.unixfs import cid_of

CHANNELS: dict[str, Channel[Any]] = {**INBOX_CHANNELS, "presence": PRESENCE, "heartbeat": HEARTBEAT,
                                     "getresult": GETRESULT, "record": RECORD, "cache": CACHE,
                                     "taskreply": TASK_REPLY}
CID = cid_of(b"x")
SIGNER = Signer.generate()
JOB = JobId.new()
MANIFEST = JobManifest(job_id=JOB, owner=NodeName("n-a"), code={"Map.py": CID}, chunks=[CID], partitions=1,
                       workers=[NodeName("n-b")], params={"a": [1, {"b": 2.5}]},
                       sources=[ChunkSource("docs/a.txt", 10, 20)])
VALID: dict[str, Any] = {
    "download": SIGNER.sign(Download(MANIFEST), "download", "n-b"),
    "domap": SIGNER.sign(DoMap(JOB, 3, 1), "domap", "n-b"),
    "buffer": SIGNER.sign(Buffer(JOB, 0, 0, CID, 2), "buffer", "n-b"),
    "cleanup": SIGNER.sign(CleanUp(JOB), "cleanup", "n-b"),
    "tf": SIGNER.sign(Tf("start", JOB), "tf", "n-b"),
    "renew": SIGNER.sign(Renew(JOB), "renew", "n-b"),
    "logs": SIGNER.sign(Logs(JOB), "logs", "n-b"),
    "record": SIGNER.sign(JobRecord(JOB, NodeName("n-a"), "mapreduce", CID, 2, 1.0, 2.0), "record", SWARM),
    "cache": SIGNER.sign(CacheRecord("ab" * 32, CID, JOB, NodeName("n-a"), 1.0), "cache", SWARM),
    "presence": Presence(NodeName("n-a"), "12D3Koo", "10.0.0.1", ["/ip4/10.0.0.1/tcp/4001"],
                         Capabilities(2, 100, False), 2, 0.5, 1.0),
    "heartbeat": Heartbeat(NodeName("n-a"), 1.0, 0.1, 0),
    "getresult": GetResult(JOB, NodeName("n-a"), "map", 1, 0, [CID], re="ab" * 16),
    "task": SIGNER.sign(Task(JOB, JobId.new(), 1, "run", CID, [TaskArg("msgpack", data="kg=="),
                                                            TaskArg("ndarray", cid=CID)], ["k"]),
                        "task", "n-b"),
    "taskreply": SIGNER.sign(TaskReply(JOB, JobId.new(), 0, NodeName("n-a"), ok=True, cid=CID, size=9,
                                       re="ab" * 16), "taskreply", JOB),
}
EXAMPLES = 1000

json_leaf = st.one_of(
    st.none(), st.booleans(), st.text(max_size=40), st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**70), max_value=2**70),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=30)


def must_only_raise_message_error(channel: Channel[Any], payload: bytes) -> None:
    try:
        message = channel.decode(payload)
    except MessageError:
        return
    assert isinstance(message, channel.message)


def test_every_channel_has_a_valid_example_that_round_trips() -> None:
    assert set(VALID) == set(CHANNELS)
    for name, channel in CHANNELS.items():
        assert channel.decode(channel.encode(VALID[name])) == VALID[name]


@pytest.mark.parametrize("name", sorted(CHANNELS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=300))
def test_random_bytes(name: str, payload: bytes) -> None:
    must_only_raise_message_error(CHANNELS[name], payload)


@pytest.mark.parametrize("name", sorted(CHANNELS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=json_value, raw=st.sampled_from(["", "NaN", "Infinity", "-Infinity", "1e999", "9" * 5000]))
def test_random_json(name: str, document: Any, raw: str) -> None:
    text = json.dumps(document)
    if raw:  # what json.dumps never writes but a hostile peer may
        text = f'{{"job_id": {raw}, "x": {text}}}' if document else raw
    must_only_raise_message_error(CHANNELS[name], text.encode())


@pytest.mark.parametrize("name", sorted(CHANNELS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), value=json_value)
def test_valid_messages_with_one_field_changed(name: str, data: st.DataObject, value: Any) -> None:
    document = dataclasses.asdict(VALID[name])
    target = document
    while isinstance(target, dict) and target and data.draw(st.booleans()):  # sometimes a nested field
        inner = data.draw(st.sampled_from(sorted(target)))
        if not isinstance(target[inner], dict):
            break
        target = target[inner]
    if target and data.draw(st.booleans()):
        target[data.draw(st.sampled_from(sorted(target)))] = value
    else:
        target[data.draw(st.text(max_size=8))] = value
    must_only_raise_message_error(CHANNELS[name], json.dumps(document).encode())


@pytest.mark.parametrize("payload", [
    b"[" * 100_000 + b"]" * 100_000,                      # RecursionError in the C parser
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),      # deeper than the limit
    b'{"job_id": ' + b"9" * 5000 + b"}",                  # Python's own 4300-digit ValueError
    b'{"job_id": NaN}', b'{"ts": Infinity}', b'{"ts": 1e999}',
])
def test_known_killers_are_message_errors(payload: bytes) -> None:
    for channel in CHANNELS.values():
        with pytest.raises(MessageError):
            channel.decode(payload)


def test_a_presence_nested_in_its_free_form_fields_is_refused() -> None:
    document = dataclasses.asdict(VALID["presence"])
    nested: Any = "x"
    for _ in range(MAX_DEPTH + 2):
        nested = [nested]
    document["extra"] = {"a": nested}
    with pytest.raises(MessageError, match=r"nested|expected str"):
        PRESENCE.decode(json.dumps(document).encode())


#: A manifest's ``params["stages"]`` as a streaming job's submitter writes it: every field kind.
STAGES = {"map": {"kind": "command", "argv": ["./m", "-x", "a b"], "shipped": True},
          "combine": {"kind": "command", "argv": ["sort"], "shipped": False},
          "reduce": {"kind": "python", "file": "Reduce.py"}}
STAGE_FILES = frozenset({"m", "Reduce.py"})
any_text = st.text(st.characters(blacklist_categories=()), max_size=20)  # lone surrogates and NUL included


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), value=st.one_of(json_value, any_text, st.lists(any_text, max_size=300)))
def test_stages_with_one_field_changed_are_stages_or_message_errors(data: st.DataObject, value: Any) -> None:
    """The stages come in a signed manifest, but the agent and the runner decode them apart
    from its schema (ipdc.wire.stages): whatever a field holds, the result is Stages whose
    commands are non-empty lists of strings with no NUL, or a MessageError."""
    document = json.loads(json.dumps(STAGES))
    target = document
    while isinstance(target, dict) and target and data.draw(st.booleans()):
        inner = data.draw(st.sampled_from(sorted(target)))
        if not isinstance(target[inner], dict):
            break
        target = target[inner]
    target[data.draw(st.sampled_from(sorted(target)) if target and data.draw(st.booleans()) else any_text)] = value
    try:
        stages = stages_of(document, STAGE_FILES)
    except MessageError:
        return
    for stage in (stages.map, stages.reduce, stages.combine):
        if isinstance(stage, CommandStage):
            assert stage.argv and all(isinstance(a, str) and a and "\0" not in a for a in stage.argv[:1])
            assert not any("\0" in a for a in stage.argv)
            assert not stage.shipped or stage.argv[0][2:] in STAGE_FILES
