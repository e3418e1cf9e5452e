"""Submitter keys, signatures, the trusted list and replay checks (pure logic, real crypto)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from ipdc.errors import TrustError
from ipdc.trust import NonceLog, Signer, TrustStore, digest, parse_public_key, verify
from ipdc.wire.cleanup import CleanUp
from ipdc.wire.domap import DoMap
from ipdc.wire.download import Download
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest

CID = Cid("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")


@pytest.fixture()
def signer(tmp_path: Path) -> Signer:
    return Signer.load_or_create(tmp_path / "keys" / "submitter.key")


def manifest(submitter: str) -> JobManifest:
    return JobManifest(job_id=JobId.new(), owner=NodeName("n-1"), code={"Map.py": CID}, chunks=[CID],
                       partitions=1, workers=[NodeName("n-1")], submitter=submitter)


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    home = tmp_path / "home"  # `ipdc trust key` before `init`: nothing of the home exists yet
    path = home / "keys" / "submitter.key"
    old = os.umask(0o022)
    try:
        first = Signer.load_or_create(path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [os.stat(d).st_mode & 0o777 for d in (home, home / "keys")] == [0o700, 0o700]
    assert Signer.load_or_create(path).public_key == first.public_key
    assert first.public_key.startswith("ed25519:")
    parse_public_key(first.public_key)


def test_signed_messages_verify_and_any_change_breaks_them(signer: Signer) -> None:
    download = signer.sign(Download(manifest(signer.public_key)), "download", "n-1")
    assert verify(download, "download", "n-1")
    domap = signer.sign(DoMap(JobId.new(), 3, attempt=1), "domap", "n-1")
    assert domap.submitter == signer.public_key and verify(domap, "domap", "n-1")
    tampered = [
        dataclasses.replace(download, manifest=dataclasses.replace(download.manifest, chunks=[CID, CID])),
        dataclasses.replace(download, manifest=dataclasses.replace(download.manifest, submitted_at=0.0)),
        dataclasses.replace(domap, task=4),
        dataclasses.replace(domap, attempt=2),
        dataclasses.replace(domap, sig=""),
        dataclasses.replace(domap, sig="!!not base64!!"),
    ]
    assert not any(verify(m, "domap" if isinstance(m, DoMap) else "download", "n-1") for m in tampered)


def test_a_signature_binds_the_recipient_and_the_channel(signer: Signer) -> None:
    """A worker that got a signed message cannot replay it to another node, or on another
    channel: the signature covers both."""
    download = signer.sign(Download(manifest(signer.public_key)), "download", "n-1")
    assert not verify(download, "download", "n-2")
    cleanup = signer.sign(CleanUp(JobId.new()), "cleanup", "n-1")
    assert verify(cleanup, "cleanup", "n-1")
    assert not verify(cleanup, "renew", "n-1")
    assert digest(cleanup) != digest(signer.sign(CleanUp(cleanup.job_id), "cleanup", "n-2"))


def test_a_signature_by_another_key_does_not_pass_for_the_claimed_one(tmp_path: Path, signer: Signer) -> None:
    attacker = Signer.load_or_create(tmp_path / "attacker.key")
    claimed = attacker.sign(CleanUp(JobId.new()), "cleanup", "n-1")
    assert not verify(dataclasses.replace(claimed, submitter=signer.public_key), "cleanup", "n-1")
    forged = attacker.sign(Download(manifest(signer.public_key)), "download", "n-1")  # the manifest's key
    assert not verify(forged, "download", "n-1")


@pytest.mark.parametrize("key", ["", "ed25519:", "ed25519:AAAA", "rsa:" + "A" * 43, "ed25519:" + "*" * 43])
def test_malformed_keys_are_refused_with_a_reason(key: str) -> None:
    with pytest.raises(TrustError, match=r"submitter key|damaged"):
        parse_public_key(key)


def test_trust_store_adds_removes_and_sees_changes_from_other_processes(tmp_path: Path, signer: Signer) -> None:
    store = TrustStore(tmp_path / "trusted_keys")
    assert signer.public_key not in store
    assert store.add(signer.public_key, "alice") and not store.add(signer.public_key)
    assert store.keys() == {signer.public_key: "alice"}
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    other = TrustStore(store.path)  # e.g. the running agent, while `ipdc trust remove` edits the file
    assert signer.public_key in other
    time.sleep(0.01)  # let the file's mtime move on filesystems with coarse timestamps
    assert store.remove(signer.public_key) and not store.remove(signer.public_key)
    os.utime(store.path, (time.time() + 1, time.time() + 1))
    assert signer.public_key not in other
    with pytest.raises(TrustError):
        store.add("not-a-key")


def test_trust_store_skips_damaged_lines(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "trusted_keys"
    path.write_text(f"# comment\n\ngarbage line\n{signer.public_key} bob\n")
    assert TrustStore(path).keys() == {signer.public_key: "bob"}


def test_nonce_log_refuses_stale_future_and_replayed(tmp_path: Path) -> None:
    now = 1_000_000.0
    log = NonceLog(tmp_path / "nonces", ttl=600)
    assert log.check("a" * 32, now - 10, now) == ""
    assert "replayed" in log.check("a" * 32, now - 10, now)
    assert "stale" in log.check("b" * 32, now - 601, now)
    assert "future" in log.check("c" * 32, now + 601, now)


def test_nonce_log_survives_a_restart(tmp_path: Path) -> None:
    now = time.time()
    assert NonceLog(tmp_path / "nonces", ttl=600).check("d" * 32, now) == ""
    assert "replayed" in NonceLog(tmp_path / "nonces", ttl=600).check("d" * 32, now)
