"""One-time enrolment tokens: handed to an operator, redeemed once by a device.

Only the SHA-256 of a token is stored, so a copy of the database enrols
nothing. A token is 32 random bytes (``secrets.token_urlsafe``) after the
``fet_`` prefix, which lets secret scanners recognise a leaked one.

Notes
-----
Every refusal of a token, whether unknown, expired or already used, raises
:class:`EnrolmentRefused` with one and the same message, so a caller cannot
learn which tokens exist. The exception also carries the server-side
:class:`RefusalReason` (and the token's id when the token exists) for the
audit trail; neither is ever sent to the device. Redemption is a single conditional ``UPDATE ...
WHERE used_at IS NULL``: of concurrent redeems of one token exactly one
changes a row, on PostgreSQL (row lock, re-checked predicate) and SQLite
(single writer) alike.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime, timedelta
from enum import Enum

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from fedge.errors import ConfigError, FedgeError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import EnrolmentTokenRow
from fl_server.enrolment._db import check_now, in_transaction, stored_time

__all__ = [
    "INVALID_TOKEN_MESSAGE",
    "MAX_TOKENS_PER_CALL",
    "MAX_TOKEN_LIFETIME",
    "TOKEN_PREFIX",
    "EnrolmentRefused",
    "RefusalReason",
    "create_tokens",
    "redeem",
]

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "fet_"  # noqa: S105 - a public prefix, not a secret
MAX_TOKENS_PER_CALL = 10_000
MAX_TOKEN_LIFETIME = timedelta(days=365)
INVALID_TOKEN_MESSAGE = "enrolment token invalid, expired or already used"  # noqa: S105
_TOKEN_BYTES = 32
_MAX_TOKEN_CHARS = 128
_MAX_CREATED_BY = 128


class RefusalReason(Enum):
    """Why the server refused an enrolment: for the audit trail, never for the device."""

    MALFORMED = "malformed_token"
    UNKNOWN = "unknown_token"
    EXPIRED = "expired_token"
    USED = "used_token"
    KEY_TAKEN = "key_taken"


class EnrolmentRefused(FedgeError, PermissionError):  # noqa: N818 - reads as what happened
    """An enrolment was refused; for a token, without saying why.

    ``reason`` and ``token_id`` (the id of a token that exists) are for the
    server's audit trail; the message is all a device is told.
    """

    def __init__(
        self,
        message: str = INVALID_TOKEN_MESSAGE,
        *,
        reason: RefusalReason = RefusalReason.UNKNOWN,
        token_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.token_id = token_id


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_tokens(
    engine: Engine,
    count: int,
    *,
    expires_at: datetime,
    now: datetime,
    audit: AuditLog,
    created_by: str | None = None,
) -> list[str]:
    """Create ``count`` one-time tokens; store their hashes and one audit event together.

    Parameters
    ----------
    engine
        The deployment's database (migrated by ``open_database``).
    count
        How many tokens, 1..``MAX_TOKENS_PER_CALL``.
    expires_at
        When the tokens stop working; after ``now`` and at most
        ``MAX_TOKEN_LIFETIME`` later.
    now
        The creation time (timezone-aware).
    audit
        The audit log of ``engine``; records ``enrolment.tokens_created``
        (token ids, never tokens or hashes).
    created_by
        Who asked for them (an operator name), 1..128 printable characters.

    Returns
    -------
    list of str
        The tokens. They are shown once: only their hashes are kept.

    Raises
    ------
    ConfigError
        If a parameter is out of range or ``audit`` lives in another database.
    StorageError
        If the database refuses the write.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError(f"count must be an integer, got {count!r}")
    if not 1 <= count <= MAX_TOKENS_PER_CALL:
        raise ConfigError(f"count must be 1..{MAX_TOKENS_PER_CALL}, got {count}")
    created = check_now(now)
    expiry = check_now(expires_at, "expires_at")
    if not created < expiry <= created + MAX_TOKEN_LIFETIME:
        raise ConfigError(
            f"expires_at must be after now and at most {MAX_TOKEN_LIFETIME.days} days later"
        )
    if created_by is not None and (
        not 0 < len(created_by) <= _MAX_CREATED_BY or not created_by.isprintable()
    ):
        raise ConfigError(f"created_by must have 1..{_MAX_CREATED_BY} printable characters")
    if audit.engine is not engine:
        raise ConfigError("the audit log must live in the enrolment database")
    tokens = [TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES) for _ in range(count)]

    def work(session: Session) -> list[int]:
        rows = [
            EnrolmentTokenRow(
                token_hash=_token_hash(token),
                created_at=stored_time(created),
                expires_at=stored_time(expiry),
                used_at=None,
                created_by=created_by,
            )
            for token in tokens
        ]
        session.add_all(rows)
        session.flush()
        ids = [row.id for row in rows]
        audit.append_in(
            session,
            AuditEventKind.ENROLMENT_TOKENS_CREATED,
            {
                "count": count,
                "token_ids": ids,
                "expires_at": stored_time(expiry),
                "created_by": created_by,
            },
        )
        return ids

    ids = in_transaction(engine, work, what="create enrolment tokens")
    logger.info("enrolment: created %d tokens (ids %d..%d)", count, min(ids), max(ids))
    return tokens


def redeem(session: Session, token: str, *, now: datetime) -> int:
    """Mark ``token`` used inside the caller's transaction and return its id.

    The caller commits (the token is spent together with whatever it enrols)
    or rolls back (the token stays unused).

    Parameters
    ----------
    session
        An open transaction on the enrolment database.
    token
        The token as handed out (``fet_...``).
    now
        The redemption time (timezone-aware); a token is valid strictly before
        its ``expires_at``.

    Returns
    -------
    int
        The token's id (recorded with the device it enrolled).

    Raises
    ------
    EnrolmentRefused
        With the same message whether the token is malformed, unknown, expired
        or already used; its ``reason`` tells which (for the audit trail).
    ConfigError
        If ``now`` is naive.
    """
    moment = stored_time(now)
    if (
        not isinstance(token, str)
        or not token.startswith(TOKEN_PREFIX)
        or len(token) > _MAX_TOKEN_CHARS
    ):
        raise EnrolmentRefused(reason=RefusalReason.MALFORMED)
    statement = (
        update(EnrolmentTokenRow)
        .where(
            EnrolmentTokenRow.token_hash == _token_hash(token),
            EnrolmentTokenRow.used_at.is_(None),
            EnrolmentTokenRow.expires_at > moment,
        )
        .values(used_at=moment)
        .returning(EnrolmentTokenRow.id)
        .execution_options(synchronize_session=False)
    )
    # The predicate and the write are one statement: a concurrent redeem of
    # the same token either waits for this one and then finds used_at set
    # (PostgreSQL re-checks the WHERE on the locked row) or runs first.
    token_id = session.execute(statement).scalar_one_or_none()
    if token_id is None:
        raise _refusal(session, token, moment)
    return token_id


def _refusal(session: Session, token: str, moment: str) -> EnrolmentRefused:
    """Say why ``token`` was not redeemed (the same message to the device either way)."""
    row = session.execute(
        select(EnrolmentTokenRow.id, EnrolmentTokenRow.used_at, EnrolmentTokenRow.expires_at).where(
            EnrolmentTokenRow.token_hash == _token_hash(token)
        )
    ).one_or_none()
    if row is None:
        return EnrolmentRefused(reason=RefusalReason.UNKNOWN)
    token_id, used_at, expires_at = row
    if used_at is not None:
        return EnrolmentRefused(reason=RefusalReason.USED, token_id=token_id)
    if expires_at <= moment:
        return EnrolmentRefused(reason=RefusalReason.EXPIRED, token_id=token_id)
    # Unused and unexpired now but not redeemed a moment ago: a concurrent redeem won
    # and rolled back, which leaves it usable; report it as used, the closest reading.
    return EnrolmentRefused(reason=RefusalReason.USED, token_id=token_id)
