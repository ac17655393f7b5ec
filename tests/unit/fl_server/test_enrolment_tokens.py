from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import EnrolmentTokenRow
from fl_server.enrolment import INVALID_TOKEN_MESSAGE, EnrolmentRefused, create_tokens, redeem
from fl_server.enrolment.tokens import RefusalReason

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EXPIRES = NOW + timedelta(days=1)
OPAQUE = f"^{INVALID_TOKEN_MESSAGE}$"


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


def _redeem(engine: Engine, token: str, now: datetime = NOW) -> int:
    with Session(engine) as session, session.begin():
        return redeem(session, token, now=now)


def test_tokens_are_prefixed_random_and_only_their_hashes_are_stored(
    engine: Engine, audit: AuditLog
) -> None:
    tokens = create_tokens(
        engine, 3, expires_at=EXPIRES, now=NOW, audit=audit, created_by="operator"
    )

    assert len(set(tokens)) == 3
    assert all(token.startswith("fet_") and len(token) == 47 for token in tokens)
    with Session(engine) as session:
        rows = list(session.execute(select(EnrolmentTokenRow)).scalars())
    stored = {value for row in rows for value in vars(row).values() if isinstance(value, str)}
    assert not stored & set(tokens)
    assert {row.created_by for row in rows} == {"operator"}
    assert {row.used_at for row in rows} == {None}


def test_creating_tokens_records_one_audit_event_without_the_tokens(
    engine: Engine, audit: AuditLog
) -> None:
    tokens = create_tokens(engine, 2, expires_at=EXPIRES, now=NOW, audit=audit)

    (event,) = audit.latest(5)
    assert event.kind is AuditEventKind.ENROLMENT_TOKENS_CREATED
    assert event.payload["count"] == 2
    assert len(event.payload["token_ids"]) == 2  # type: ignore[arg-type]
    assert event.payload["expires_at"] == "2026-03-02T12:00:00.000000+00:00"
    assert not any(token in str(event.payload) for token in tokens)
    assert audit.verify().ok


def test_a_token_redeems_once(engine: Engine, audit: AuditLog) -> None:
    (token,) = create_tokens(engine, 1, expires_at=EXPIRES, now=NOW, audit=audit)

    token_id = _redeem(engine, token)

    assert token_id >= 1
    with pytest.raises(EnrolmentRefused, match=OPAQUE):
        _redeem(engine, token)


def test_a_token_works_until_just_before_it_expires(engine: Engine, audit: AuditLog) -> None:
    first, second = create_tokens(engine, 2, expires_at=EXPIRES, now=NOW, audit=audit)

    _redeem(engine, first, now=EXPIRES - timedelta(microseconds=1))
    with pytest.raises(EnrolmentRefused, match=OPAQUE):
        _redeem(engine, second, now=EXPIRES)


def test_a_refusal_says_why_to_the_server_only(engine: Engine, audit: AuditLog) -> None:
    used, expired = create_tokens(engine, 2, expires_at=EXPIRES, now=NOW, audit=audit)
    used_id = _redeem(engine, used)
    expired_id = used_id + 1

    refusals: list[EnrolmentRefused] = []
    for token, now in (
        (used, NOW),
        (expired, EXPIRES),
        ("fet_unknown", NOW),
        ("unprefixed", NOW),
    ):
        with pytest.raises(EnrolmentRefused, match=OPAQUE) as caught:
            _redeem(engine, token, now=now)
        refusals.append(caught.value)

    assert [(r.reason, r.token_id) for r in refusals] == [
        (RefusalReason.USED, used_id),
        (RefusalReason.EXPIRED, expired_id),
        (RefusalReason.UNKNOWN, None),
        (RefusalReason.MALFORMED, None),
    ]


@pytest.mark.parametrize("token", ["fet_unknown", "unprefixed", "fet_" + "x" * 200, "", 42])
def test_unknown_or_malformed_tokens_fail_with_the_same_message(
    engine: Engine, audit: AuditLog, token: object
) -> None:
    create_tokens(engine, 1, expires_at=EXPIRES, now=NOW, audit=audit)

    with pytest.raises(EnrolmentRefused, match=OPAQUE):
        _redeem(engine, token)  # type: ignore[arg-type]


def test_a_rolled_back_redeem_leaves_the_token_usable(engine: Engine, audit: AuditLog) -> None:
    (token,) = create_tokens(engine, 1, expires_at=EXPIRES, now=NOW, audit=audit)

    with Session(engine) as session:
        session.begin()
        redeem(session, token, now=NOW)
        session.rollback()

    assert _redeem(engine, token) >= 1


def test_concurrent_redeems_of_one_token_have_exactly_one_winner(
    engine: Engine, audit: AuditLog
) -> None:
    (token,) = create_tokens(engine, 1, expires_at=EXPIRES, now=NOW, audit=audit)
    start = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        start.wait()
        try:
            _redeem(engine, token)
            outcome = "won"
        except EnrolmentRefused:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    with Session(engine) as session:
        used = session.scalar(select(func.count()).where(EnrolmentTokenRow.used_at.is_not(None)))
    assert used == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, r"count must be 1\.\.10000"),
        ({"count": 10_001}, r"count must be 1\.\.10000"),
        ({"count": True}, "count must be an integer"),
        ({"count": 1.0}, "count must be an integer"),
        ({"expires_at": NOW}, "expires_at must be after now"),
        ({"expires_at": NOW + timedelta(days=366)}, "at most 365 days later"),
        ({"expires_at": datetime(2026, 3, 2)}, "expires_at must be a timezone-aware"),
        ({"now": datetime(2026, 3, 1)}, "now must be a timezone-aware"),
        ({"created_by": ""}, "created_by must have"),
        ({"created_by": "x" * 129}, "created_by must have"),
        ({"created_by": "a\nb"}, "created_by must have"),
    ],
)
def test_create_tokens_refuses_bad_parameters(
    engine: Engine, audit: AuditLog, kwargs: dict[str, object], match: str
) -> None:
    arguments: dict[str, object] = {"count": 1, "expires_at": EXPIRES, "now": NOW}
    arguments.update(kwargs)

    with pytest.raises(ConfigError, match=match):
        create_tokens(engine, audit=audit, **arguments)  # type: ignore[arg-type]
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(EnrolmentTokenRow)) == 0
    assert audit.latest(1) == []


def test_create_tokens_refuses_an_audit_log_of_another_database(
    engine: Engine, tmp_path: object
) -> None:
    from fl_server.db import open_database

    other = open_database(f"sqlite:///{tmp_path}/other.db")
    try:
        with pytest.raises(ConfigError, match="audit log must live in the enrolment database"):
            create_tokens(engine, 1, expires_at=EXPIRES, now=NOW, audit=AuditLog(other))
    finally:
        other.dispose()


def test_redeem_needs_an_aware_time(engine: Engine, audit: AuditLog) -> None:
    (token,) = create_tokens(engine, 1, expires_at=EXPIRES, now=NOW, audit=audit)

    with pytest.raises(ConfigError, match="timezone-aware"):
        _redeem(engine, token, now=datetime(2026, 3, 1))
