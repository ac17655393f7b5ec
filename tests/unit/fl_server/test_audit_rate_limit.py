"""The windowed recorder's own checks (its windows are tested through both recorders)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine

from fedge.errors import ConfigError
from fl_server.audit import AuditLog
from fl_server.audit.rate_limit import WindowLimits, check_at_least, check_window
from fl_server.enrolment.refusals import RefusalRecorder
from fl_server.events.rejections import RejectionRecorder, RejectReason


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"events_per_window": -1}, "events_per_window must be >= 0, got -1"),
        ({"events_per_window": True}, "events_per_window must be >= 0, got True"),
        ({"window": timedelta(seconds=-1)}, "window must be positive"),
        ({"window": 60}, "window must be a timedelta, got 60"),
        ({"max_names": 0}, "max_names must be >= 1, got 0"),
    ],
)
def test_window_limits_are_checked(fields: dict[str, object], match: str) -> None:
    limits: dict[str, object] = {
        "events_per_window": 1,
        "window": timedelta(minutes=1),
        "max_names": 1,
    }

    with pytest.raises(ConfigError, match=match):
        WindowLimits(**(limits | fields))  # type: ignore[arg-type]


def test_a_limit_is_a_whole_number() -> None:
    check_at_least("max_peers", 3, 3)

    with pytest.raises(ConfigError, match=r"max_peers must be >= 3, got 2\.5"):
        check_at_least("max_peers", 2.5, 3)  # type: ignore[arg-type]


def test_a_window_is_a_positive_timedelta() -> None:
    check_window(timedelta(microseconds=1))

    with pytest.raises(ConfigError, match="window must be positive"):
        check_window(timedelta(0))


def test_a_naive_clock_is_refused(engine: Engine) -> None:
    audit = AuditLog(engine)
    rejections = RejectionRecorder(audit, clock=lambda: datetime(2026, 3, 1, 12, 0))
    refusals = RefusalRecorder(audit, clock=lambda: datetime(2026, 3, 1, 12, 0))

    with pytest.raises(ConfigError, match="timezone-aware"):
        rejections.record(RejectReason.MALFORMED, None)
    with pytest.raises(ConfigError, match="timezone-aware"):
        refusals.flush()
