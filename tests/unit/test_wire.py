"""Config and channel payloads: untrusted input is rejected by name."""

from __future__ import annotations

import json

import pytest

from ipdc.config import config_from_dict
from ipdc.errors import ConfigError, MessageError
from ipdc.wire.channel import MAX_PAYLOAD
from ipdc.wire.getresult import GETRESULT
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.inbox import INBOX_CHANNELS

JOB = "0123456789abcdef0123456789abcdef"
CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


@pytest.mark.parametrize("data,where", [
    ({"broker": {"prot": 1}}, "broker.prot"),
    ({"kubo": {"api_port": "5001"}}, "kubo.api_port"),
    ({"kubo": {"api_port": 70000}}, "kubo.api_port"),
    ({"kubo": {"bootstrap": [1]}}, "kubo.bootstrap[0]"),
    ({"node": {"tf": "maybe"}}, "node.tf"),
    ({"sandbox": {"nice": True}}, "sandbox.nice"),
    ({"nodes": {}}, "nodes"),
    ({"agent": {"warm_runners": -1}}, "agent.warm_runners"),
    ({"agent": {"heartbeat_interval": float("nan")}}, "agent.heartbeat_interval"),
    ({"sandbox": {"task_timeout": float("inf")}}, "sandbox.task_timeout"),
])
def test_config_errors_name_the_bad_key(data: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace("[", r"\[")):
        config_from_dict(data)


def test_shipped_ipdc_conf_is_valid() -> None:
    from pathlib import Path

    from ipdc.config import load_config

    load_config(Path(__file__).resolve().parents[2] / "ipdc.conf")


@pytest.mark.parametrize("value,cls", [
    ("../etc", JobId), ("A" * 32, JobId), ("n-1/+", NodeName), ("#", NodeName),
    ("Qm123", Cid), ("bafy/../x", Cid), (5, Cid),
])
def test_identifiers_reject_unsafe_values(value: object, cls: type) -> None:
    with pytest.raises(MessageError):
        cls(value)


@pytest.mark.parametrize("payload", [
    b"", b"\xff", b"null", b"[]", b'"x"', b"{", json.dumps({"job_id": "../../x", "task": 0}).encode(),
    json.dumps({"job_id": JOB, "task": "0"}).encode(),
    json.dumps({"job_id": JOB, "task": 0, "evil": 1}).encode(),
    json.dumps({"job_id": JOB, "partition": 0, "task": 0, "cid": "not-a-cid"}).encode(),
    b"{" + b" " * MAX_PAYLOAD + b"}",
])
@pytest.mark.parametrize("name", sorted(INBOX_CHANNELS))
def test_every_inbox_channel_rejects_garbage(name: str, payload: bytes) -> None:
    with pytest.raises(MessageError):
        INBOX_CHANNELS[name].decode(payload)


def test_getresult_round_trip_and_kind_check() -> None:
    from ipdc.wire.getresult import GetResult

    msg = GetResult(JobId(JOB), NodeName("n-1"), "map", 1, 0, [Cid(CID)])
    assert GETRESULT.decode(GETRESULT.encode(msg)) == msg
    with pytest.raises(MessageError, match="kind"):
        GETRESULT.decode(json.dumps({"job_id": JOB, "peer": "n-1", "kind": "rm -rf"}).encode())


