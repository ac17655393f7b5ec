"""Private helpers of the enrolment package: stored times and retried transactions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from fedge.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_ATTEMPTS = 20


def check_now(moment: datetime, what: str = "now") -> datetime:
    """Return ``moment`` in UTC; ConfigError if it is not a timezone-aware datetime."""
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise ConfigError(f"{what} must be a timezone-aware datetime")
    return moment.astimezone(UTC)


def stored_time(moment: datetime, what: str = "now") -> str:
    """Format ``moment`` as stored: fixed-width UTC ISO 8601, so strings order as times."""
    return check_now(moment, what).isoformat(timespec="microseconds")


def in_transaction(engine: Engine, work: Callable[[Session], _T], *, what: str) -> _T:
    """Run ``work`` in one transaction, retrying it when it loses a race.

    ``IntegrityError`` and ``OperationalError`` (a concurrent writer took the
    audit head or a unique value; SQLite was busy) roll everything back and run
    ``work`` again on a fresh transaction; ``work`` re-checks its preconditions
    each time. A fedge error raised by ``work`` rolls back and propagates.

    Raises
    ------
    StorageError
        If the database refuses the transaction, or it keeps losing races.
    """
    last_error: Exception | None = None
    for attempt in range(_ATTEMPTS):
        try:
            with Session(engine) as session, session.begin():
                return work(session)
        except (IntegrityError, OperationalError) as exc:
            last_error = exc
            logger.info("enrolment: %s raced with another writer; retrying", what)
            time.sleep(0.005 * (attempt + 1))
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot {what}: {type(exc).__name__}") from exc
    raise StorageError(f"cannot {what}: too many concurrent writers ({type(last_error).__name__})")
