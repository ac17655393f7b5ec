"""The device's stored revocation list: verified before it is kept, replaced only by a newer one."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedge.errors import ConfigError, StorageError
from fl_client.revocations import REVOCATION_FILE, RevocationStore, nothing_revoked
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from secure_agg.revocation import RevokedDevice, build_revocation_list

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(31))
POLICY = ProtocolPolicy(threat_model=ThreatModel.ACTIVE, authority_public_key=AUTHORITY.public_key)


def _list(
    *ids: str, sequence: int, now: datetime = NOW, authority: EnrolmentAuthority = AUTHORITY
) -> bytes:
    revoked = [RevokedDevice(device_id=device_id, revoked_at=now) for device_id in ids]
    return build_revocation_list(authority, revoked, sequence=sequence, now=now)


def _store(directory: Path, now: datetime = NOW) -> RevocationStore:
    return RevocationStore(directory, policy=POLICY, clock=now.timestamp)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_a_device_without_a_list_revokes_nobody(tmp_path: Path) -> None:
    store = _store(tmp_path)

    assert store.current() is None
    assert store.revoked_ids() == frozenset()
    assert store(_context()) == frozenset()
    assert nothing_revoked(_context()) == frozenset()


def test_a_verified_list_is_stored_privately_and_read_back(tmp_path: Path) -> None:
    store = _store(tmp_path)

    accepted = store.accept(_list("dev-a", "dev-b", sequence=2))

    assert accepted.sequence == 2
    assert store.revoked_ids() == frozenset({"dev-a", "dev-b"})
    assert store(_context()) == frozenset({"dev-a", "dev-b"})
    path = tmp_path / REVOCATION_FILE
    assert store.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [REVOCATION_FILE]  # no temporary left


def test_a_higher_sequence_replaces_the_stored_list(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.accept(_list("dev-a", sequence=1))

    store.accept(_list("dev-a", "dev-c", sequence=3))

    current = store.current()
    assert current is not None and current.sequence == 3
    assert store.revoked_ids() == frozenset({"dev-a", "dev-c"})


def test_a_replayed_older_list_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    older = _list("dev-a", sequence=1)
    newer = _list("dev-a", "dev-b", sequence=2)
    store.accept(newer)

    with pytest.raises(CryptoError):
        store.accept(older)

    assert (tmp_path / REVOCATION_FILE).read_bytes() == newer
    assert store.revoked_ids() == frozenset({"dev-a", "dev-b"})


def test_a_list_with_the_stored_sequence_changes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = _list("dev-a", sequence=2)
    store.accept(first)

    kept = store.accept(_list("dev-a", sequence=2, now=NOW + timedelta(minutes=1)))

    assert kept.issued_at == NOW
    assert (tmp_path / REVOCATION_FILE).read_bytes() == first


@pytest.mark.parametrize(
    "data",
    [
        _list("dev-a", sequence=5, authority=EnrolmentAuthority.generate(DeterministicRandom(32))),
        _list("dev-a", sequence=5, now=NOW + timedelta(hours=1)),  # from the device's future
        b"{}",
        b"",
    ],
    ids=["other-authority", "future", "malformed", "empty"],
)
def test_a_list_that_does_not_verify_is_never_stored(tmp_path: Path, data: bytes) -> None:
    store = _store(tmp_path)

    with pytest.raises(CryptoError):
        store.accept(data)

    assert not (tmp_path / REVOCATION_FILE).exists()
    assert store.revoked_ids() == frozenset()


def test_a_damaged_stored_list_is_refused_then_replaced_by_a_valid_one(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.accept(_list("dev-a", sequence=4))
    path = tmp_path / REVOCATION_FILE
    path.write_bytes(path.read_bytes().replace(b"dev-a", b"dev-z"))

    with pytest.raises(CryptoError):
        store.revoked_ids()

    store.accept(_list("dev-a", sequence=1))
    assert store.revoked_ids() == frozenset({"dev-a"})


def test_a_clock_set_back_later_keeps_the_stored_list_readable(tmp_path: Path) -> None:
    _store(tmp_path).accept(_list("dev-a", sequence=1))

    earlier = _store(tmp_path, now=NOW - timedelta(days=30))

    assert earlier.revoked_ids() == frozenset({"dev-a"})


def test_a_policy_without_an_authority_has_no_store(tmp_path: Path) -> None:
    policy = ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST)

    with pytest.raises(ConfigError, match="enrolment authority key"):
        RevocationStore(tmp_path, policy=policy)


def test_an_unreadable_stored_list_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / REVOCATION_FILE).mkdir()

    with pytest.raises(StorageError, match="cannot read the revocation list"):
        _store(tmp_path).revoked_ids()


def test_a_list_that_cannot_be_written_is_a_storage_error(tmp_path: Path) -> None:
    store = _store(tmp_path / "missing")

    with pytest.raises(StorageError, match="cannot store the revocation list"):
        store.accept(_list("dev-a", sequence=1))
