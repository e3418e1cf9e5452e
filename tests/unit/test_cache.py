"""The cache key's canonical encoding and the checks a cache record must pass
(ipdc.wire.cache, ipdc.control.cache.check_record). The records on a real broker,
forged by a member, are in tests/integration/test_cache.py."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest

from ipdc.control.cache import check_record
from ipdc.errors import MessageError
from ipdc.trust import Signer, TrustStore
from ipdc.wire.cache import CACHE, MAX_RECORD, CacheRecord, cache_key
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.record import RECORD, SWARM

CID_A = Cid("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
CID_B = Cid("bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354")
BASE = {"code": {"Map.py": "m", "Reduce.py": "r"}, "stages": {"map": {"kind": "python", "file": "Map.py"}},
        "input_cid": "i", "input_name": "", "k": 3, "chunks": None, "verify": 1, "majority": False}


def test_the_key_is_sha256_of_sorted_compact_json() -> None:
    """Pinned byte for byte: every node, of every version with this KEY_VERSION, must agree."""
    encoded = (b'{"chunks":null,"code":{"Map.py":"m","Reduce.py":"r"},"input":"i","input_name":"","k":3,'
               b'"majority":false,"partitioner":"crc32-utf8-mod-k/1","stages":{"map":{"file":"Map.py",'
               b'"kind":"python"}},"v":2,"verify":1}')
    assert cache_key(**BASE) == hashlib.sha256(encoded).hexdigest()  # type: ignore[arg-type]
    reordered = {**BASE, "code": {"Reduce.py": "r", "Map.py": "m"}}
    assert cache_key(**reordered) == cache_key(**BASE)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [{"code": {"Map.py": "m2", "Reduce.py": "r"}},
                                    {"code": {"Map.py": "m", "Reduce.py": "r2"}}, {"input_cid": "j"},
                                    {"input_name": "b.txt"},
                                    {"stages": {"map": {"kind": "command", "argv": ["cut", "-f", "2"]}}},
                                    {"k": 4}, {"chunks": 8}, {"verify": 2}, {"majority": True}])
def test_everything_that_decides_the_result_changes_the_key(change: dict[str, object]) -> None:
    assert cache_key(**{**BASE, **change}) != cache_key(**BASE)  # type: ignore[arg-type]


@pytest.fixture
def trusted(tmp_path: Path) -> tuple[Signer, TrustStore]:
    signer, store = Signer.generate(), TrustStore(tmp_path / "trusted_keys")
    store.add(signer.public_key, "n-1")
    return signer, store


KEY = "ab" * 32


def record(key: str = KEY, owner: str = "n-1") -> CacheRecord:
    return CacheRecord(key, CID_B, JobId.new(), NodeName(owner), time.time())


def test_a_trusted_record_on_its_owners_topic_is_accepted(trusted: tuple[Signer, TrustStore]) -> None:
    signer, store = trusted
    signed = signer.sign(record(), CACHE.name, SWARM)
    assert check_record(CACHE.encode(signed), "n-1", KEY, store) == signed


def test_forged_records_are_refused_with_the_reason(trusted: tuple[Signer, TrustStore]) -> None:
    signer, store = trusted
    good = signer.sign(record(), CACHE.name, SWARM)
    stranger = Signer.generate().sign(record(), CACHE.name, SWARM)
    cases = {
        "does not trust": CACHE.encode(stranger),
        "signature does not match": CACHE.encode(dataclasses.replace(good, result_cid=CID_A)),
        "names n-1 and key": CACHE.encode(signer.sign(record(key="cd" * 32), CACHE.name, SWARM)),
        "malformed": b'{"key": "' + KEY.encode() + b'"}',
        "bytes from": b" " * (MAX_RECORD + 1),
    }
    for reason, payload in cases.items():
        got = check_record(payload, "n-1", KEY, store)
        assert isinstance(got, str) and reason in got, (reason, got)
    # On another member's topic, or signed for another channel or recipient.
    assert "names n-1" in str(check_record(CACHE.encode(good), "n-2", KEY, store))
    for channel, to in ((RECORD.name, SWARM), (CACHE.name, "n-1")):
        moved = signer.sign(record(), channel, to)
        assert "signature does not match" in str(check_record(CACHE.encode(moved), "n-1", KEY, store))
    with pytest.raises(MessageError, match="SHA-256"):
        record(key="../other")
