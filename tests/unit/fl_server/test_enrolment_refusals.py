"""The refusal recorder: individual records up to a limit per window, then one summary."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from fedge.errors import ConfigError, StorageError
from fl_server.audit import AuditEvent, AuditEventKind, AuditLog
from fl_server.audit.events import JSONValue
from fl_server.enrolment.refusals import RefusalLimits, RefusalRecorder

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REFUSED = AuditEventKind.ENROLMENT_REFUSED
FAILED = AuditEventKind.AUTH_FAILED


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _recorder(audit: AuditLog, clock: Clock, **limits: object) -> RefusalRecorder:
    return RefusalRecorder(audit, limits=RefusalLimits(**limits), clock=clock)  # type: ignore[arg-type]


def _events(audit: AuditLog) -> list[AuditEvent]:
    return list(audit.iter())


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def test_refusals_up_to_the_limit_get_their_own_records(audit: AuditLog, clock: Clock) -> None:
    recorder = _recorder(audit, clock, events_per_window=2)

    written = [
        recorder.record(REFUSED, "unknown_token", "10.0.0.1", {"token_id": None}),
        recorder.record(REFUSED, "used_token", "10.0.0.2", {"token_id": 7}),
        recorder.record(REFUSED, "used_token", "10.0.0.2", {"token_id": 7}),
    ]

    assert written == [True, True, False]
    assert [(e.kind, dict(e.payload)) for e in _events(audit)] == [
        (REFUSED, {"reason": "unknown_token", "peer": "10.0.0.1", "token_id": None}),
        (REFUSED, {"reason": "used_token", "peer": "10.0.0.2", "token_id": 7}),
    ]


def test_a_summary_is_written_once_the_window_ends(audit: AuditLog, clock: Clock) -> None:
    recorder = _recorder(audit, clock, events_per_window=1, window=timedelta(seconds=60))
    recorder.record(REFUSED, "unknown_token", "10.0.0.1")
    for peer in ("10.0.0.1", "10.0.0.2", "10.0.0.1"):
        recorder.record(REFUSED, "expired_token", peer)

    clock.now = NOW + timedelta(seconds=59)
    recorder.flush()
    assert len(_events(audit)) == 1  # the window is still open

    clock.now = NOW + timedelta(seconds=60)
    recorder.flush()
    recorder.flush()  # a second flush writes nothing more

    summary = _events(audit)[1:]
    assert [(e.kind, dict(e.payload)) for e in summary] == [
        (
            AuditEventKind.AUDIT_SUPPRESSED,
            {
                "kind": "enrolment.refused",
                "suppressed": 3,
                "limit": 1,
                "window_start": _stamp(NOW),
                "window_end": _stamp(NOW + timedelta(seconds=60)),
                "reasons": {"expired_token": 3},
                "peers": {"10.0.0.1": 2, "10.0.0.2": 1},
                "other_peers": 0,
            },
        )
    ]


def test_the_next_refusal_after_a_window_summarises_it_and_opens_another(
    audit: AuditLog, clock: Clock
) -> None:
    recorder = _recorder(audit, clock, events_per_window=1, window=timedelta(seconds=10))
    recorder.record(FAILED, "unknown_route", "10.0.0.1")
    recorder.record(FAILED, "unknown_route", "10.0.0.1")

    clock.now = NOW + timedelta(seconds=25)
    assert recorder.record(FAILED, "fleet_node_signature", "10.0.0.3") is True

    kinds = [e.kind for e in _events(audit)]
    assert kinds == [FAILED, AuditEventKind.AUDIT_SUPPRESSED, FAILED]
    summary = _events(audit)[1].payload
    assert summary["kind"] == "auth.failed"
    assert summary["suppressed"] == 1
    assert summary["window_end"] == _stamp(NOW + timedelta(seconds=10))


def test_a_window_without_suppressed_refusals_writes_no_summary(
    audit: AuditLog, clock: Clock
) -> None:
    recorder = _recorder(audit, clock, events_per_window=5)
    recorder.record(REFUSED, "unknown_token", "10.0.0.1")

    clock.now = NOW + timedelta(hours=1)
    recorder.flush()
    recorder.close()

    assert [e.kind for e in _events(audit)] == [REFUSED]


def test_each_kind_has_its_own_window(audit: AuditLog, clock: Clock) -> None:
    recorder = _recorder(audit, clock, events_per_window=1)

    assert recorder.record(FAILED, "unknown_route", "10.0.0.1") is True
    assert recorder.record(FAILED, "unknown_route", "10.0.0.1") is False
    assert recorder.record(REFUSED, "unknown_token", "10.0.0.1") is True


def test_close_summarises_open_windows(audit: AuditLog, clock: Clock) -> None:
    recorder = _recorder(audit, clock, events_per_window=1)
    for _ in range(4):
        recorder.record(FAILED, "unknown_route", "10.0.0.1")
    clock.now = NOW + timedelta(seconds=5)

    recorder.close()

    last = _events(audit)[-1]
    assert last.kind is AuditEventKind.AUDIT_SUPPRESSED
    assert (last.payload["suppressed"], last.payload["window_end"]) == (
        3,
        _stamp(NOW + timedelta(seconds=5)),
    )


def test_a_flood_from_many_peers_names_only_the_first_few(audit: AuditLog, clock: Clock) -> None:
    recorder = _recorder(audit, clock, events_per_window=1, max_peers=2)
    recorder.record(REFUSED, "unknown_token", "first")
    for index in range(1000):
        recorder.record(REFUSED, "unknown_token", f"10.0.{index // 256}.{index % 256}")
    recorder.record(REFUSED, "unknown_token", "10.0.0.0")

    recorder.close()

    events = _events(audit)
    assert len(events) == 2
    assert events[1].payload["peers"] == {"10.0.0.0": 2, "10.0.0.1": 1}
    assert events[1].payload["other_peers"] == 998
    assert events[1].payload["suppressed"] == 1001


@pytest.mark.parametrize(
    ("peer", "stored"),
    [
        (None, "unknown"),
        ("", "unknown"),
        ("x" * 129, "unknown"),
        ("a\nb", "unknown"),
        ("::1", "::1"),
    ],
)
def test_a_peer_is_kept_only_when_it_is_a_short_printable_address(
    audit: AuditLog, clock: Clock, peer: str | None, stored: str
) -> None:
    _recorder(audit, clock).record(REFUSED, "unknown_token", peer)

    assert _events(audit)[0].payload["peer"] == stored


@pytest.mark.parametrize(
    ("kind", "reason", "details", "match"),
    [
        (AuditEventKind.DEVICE_REVOKED, "x", None, "is not a refusal kind"),
        (REFUSED, "", None, "short identifier"),
        (REFUSED, "fet_abc def", None, "short identifier"),
        (REFUSED, "x" * 65, None, "short identifier"),
        (REFUSED, "unknown_token", {"peer": "spoofed"}, "must not repeat reason or peer"),
    ],
)
def test_programming_errors_are_refused(
    audit: AuditLog,
    clock: Clock,
    kind: AuditEventKind,
    reason: str,
    details: Mapping[str, JSONValue] | None,
    match: str,
) -> None:
    with pytest.raises(ConfigError, match=match):
        _recorder(audit, clock).record(kind, reason, "10.0.0.1", details)


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        ({"events_per_window": 0}, "events_per_window must be >= 1"),
        ({"window": timedelta(0)}, "window must be positive"),
        ({"max_peers": 0}, "max_peers must be >= 1"),
    ],
)
def test_limits_are_checked(limits: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RefusalLimits(**limits)  # type: ignore[arg-type]


def test_a_failed_audit_write_does_not_reach_the_caller(
    audit: AuditLog, clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> AuditEvent:
        raise StorageError("database down")

    monkeypatch.setattr(audit, "append", broken)

    assert _recorder(audit, clock).record(REFUSED, "unknown_token", "10.0.0.1") is True
    assert "cannot audit enrolment.refused (unknown_token): database down" in caplog.text
