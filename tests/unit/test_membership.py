"""Invite tokens, certificates, membership messages, private files and the member list:
pure logic, no processes."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from ipdc import pki
from ipdc.errors import MessageError, NodeError, TokenError, TrustError
from ipdc.node.invite import Invite
from ipdc.node.membership import parse_duration
from ipdc.private import write_private
from ipdc.roster import Member, Roster
from ipdc.trust import Signer, verify
from ipdc.wire.membership import ENROLL_REPLY, SWARMKEY, EnrollReply, SwarmKey, swarm_key_fingerprint

FOUNDER = Signer.generate()


def make_invite(ttl: dt.timedelta) -> tuple[Invite, pki.Authority]:
    ca = pki.Authority.create("test")
    key = pki.new_key()
    cert = ca.issue("enroll-0123abcd", key.public_key(), not_after=pki.now() + ttl)
    invite = Invite(broker_host="10.1.2.3", broker_port=8883, ca=pki.cert_pem(ca.cert).decode(),
                    identity="enroll-0123abcd", cert=pki.cert_pem(cert).decode(),
                    key=pki.key_pem(key).decode(), founder=FOUNDER.public_key)
    return invite, ca


def test_invite_round_trip_and_damage() -> None:
    invite, _ = make_invite(dt.timedelta(hours=1))
    token = invite.encode()
    assert Invite.decode(token) == invite and "\n" not in token and token.startswith("ipdc2-")
    for bad in ("hello", token[:-10], "ipdc2-" + "A" * 40):
        with pytest.raises(TokenError):
            Invite.decode(bad)
    with pytest.raises(TokenError, match=r"older IPDC.*ipdc invite"):
        Invite.decode("ipdc1-" + "A" * 40)


def test_an_invite_carries_no_long_term_secret_and_expires() -> None:
    invite, ca = make_invite(dt.timedelta(hours=24))
    assert "swarm" not in invite.encode() and pki.key_pem(ca.key).decode() not in invite.encode()
    assert dt.timedelta(hours=23) < invite.expires() - pki.now() <= dt.timedelta(hours=24)
    invite.check_fresh()
    expired, _ = make_invite(dt.timedelta(seconds=-90))
    with pytest.raises(TokenError, match=r"expired at .*ago.*ipdc invite"):
        expired.check_fresh()


def test_parse_duration() -> None:
    assert parse_duration("24h") == parse_duration("24") == dt.timedelta(hours=24)
    assert parse_duration("90s") == dt.timedelta(seconds=90)
    assert parse_duration("30m") == parse_duration("30min") == dt.timedelta(minutes=30)
    assert parse_duration("7d") == dt.timedelta(days=7)
    for bad in ("0h", "-1h", "soon", "1y"):
        with pytest.raises(TokenError, match="--ttl"):
            parse_duration(bad)


def test_a_certificate_from_a_csr_is_checked_against_key_name_and_ca() -> None:
    ca = pki.Authority.create("a")
    key = pki.new_key()
    public = pki.csr_public_key(pki.make_csr(key).decode())
    cert = ca.issue("n-00000001", public)
    pki.check_issued(cert, ca.cert, key.public_key(), "n-00000001")
    assert pki.common_name(cert) == "n-00000001"
    with pytest.raises(TrustError, match=r"not 'n-00000002'"):
        pki.check_issued(cert, ca.cert, key.public_key(), "n-00000002")
    with pytest.raises(TrustError, match="not for this node's key"):
        pki.check_issued(cert, ca.cert, pki.new_key().public_key(), "n-00000001")
    with pytest.raises(TrustError, match="not signed by the swarm's CA"):
        pki.check_issued(cert, pki.Authority.create("b").cert, key.public_key(), "n-00000001")
    with pytest.raises(TrustError):
        pki.csr_public_key("-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n")


def test_membership_messages_are_signed_for_one_recipient_and_checked() -> None:
    key = "ab" * 32
    signed = FOUNDER.sign(SwarmKey(key, 1.0), SWARMKEY.name, "n-00000001")
    assert verify(signed, SWARMKEY.name, "n-00000001") and signed.submitter == FOUNDER.public_key
    assert not verify(signed, SWARMKEY.name, "n-00000002")
    assert SWARMKEY.decode(SWARMKEY.encode(signed)) == signed
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32):
        with pytest.raises(MessageError, match="64 lowercase hex"):
            SwarmKey(bad, 1.0)
    with pytest.raises(MessageError):
        ENROLL_REPLY.decode(b'{"name": "n-1", "swarm_key": "short"}')
    assert ENROLL_REPLY.decode(ENROLL_REPLY.encode(EnrollReply(error="no"))).error == "no"
    assert swarm_key_fingerprint(key) != swarm_key_fingerprint("cd" * 32)
    assert key not in swarm_key_fingerprint(key)


def test_private_files_are_0600_created_once_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_private(path, "one")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "one"
    with pytest.raises(FileExistsError):
        write_private(path, "two")
    os.symlink(tmp_path / "elsewhere", tmp_path / "planted")
    with pytest.raises(FileExistsError):
        write_private(tmp_path / "planted", "three")
    assert not (tmp_path / "elsewhere").exists()
    write_private(path, "four", replace=True)
    assert path.read_text() == "four" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planted", "secret"]


def test_the_member_list_records_and_removes(tmp_path: Path) -> None:
    roster = Roster(tmp_path / "members.json")
    roster.add(Member("n-00000001", FOUNDER.public_key, "ab", "10.0.0.1", 1.0))
    roster.add(Member("n-00000002", "ed25519:x", "cd", "10.0.0.2", 2.0, enroll="enroll-0123abcd"))
    with pytest.raises(NodeError, match="exists already"):
        roster.add(Member("n-00000002", "ed25519:y", "ef", "10.0.0.3", 3.0))
    assert roster.by_enroll("enroll-0123abcd") == roster.get("n-00000002")
    assert roster.mark_removed("n-00000002", 5.0).removed == 5.0
    assert roster.mark_removed("n-00000002", 9.0).removed == 5.0  # removing again changes nothing
    with pytest.raises(NodeError, match=r"not a member.*n-00000001"):
        roster.mark_removed("n-99999999", 6.0)
    assert stat.S_IMODE((tmp_path / "members.json").stat().st_mode) == 0o600
    assert [m.name for m in Roster(tmp_path / "members.json").members() if not m.removed] == ["n-00000001"]
