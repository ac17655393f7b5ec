"""What a deployment's configuration and keys leave in the audit trail.

``fedge server start`` records ``config.loaded`` (the SHA-256 of the
configuration and its values) every time it starts, and ``config.changed``
(the previous and new hash and which sections and keys differ) before it when
the configuration is not the one the last start recorded. ``fedge server init``
records ``key.created`` for every key it makes.

Notes
-----
The recorded configuration is the parsed one (defaults filled in), not the
file's bytes: editing a comment changes nothing, and the hash of the defaults is
the same whether they were written out or not. A secret never enters the trail:
the password of ``server.database_url`` is replaced by ``***`` before anything is
hashed or recorded (an unsalted hash of a password can be brute-forced), so a
change of that password alone is not a configuration change; a change of its
user, host or database is.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from enum import Enum

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from fedge.errors import ConfigError, StorageError
from fl_server.audit import AuditEvent, AuditEventKind, AuditLog, canonical_json
from fl_server.audit.events import JSONValue, parse_canonical
from fl_server.db.schema import AuditRecordRow
from fl_server.deployment import DeploymentConfig

__all__ = ["NewKey", "RecordedConfig", "record_config", "record_keys", "recorded_config"]

logger = logging.getLogger(__name__)

_ATTEMPTS = 20
_REDACTED = "***"
_SECRET_WORDS = ("pass", "secret", "key", "token")


def _json_value(value: object) -> JSONValue:
    if isinstance(value, Enum):
        return _json_value(value.value)
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(f"a configuration value of type {type(value).__name__} is not recordable")


def _redacted_url(url: str) -> str:
    if not url:
        return url
    try:
        parsed = make_url(url)
    except ArgumentError:
        return _REDACTED  # unparseable: it may hold anything, so nothing of it is kept
    # A driver option may carry a credential too (``?password=``, ``?sslkey=``).
    query = {
        name: _REDACTED if any(word in name.lower() for word in _SECRET_WORDS) else value
        for name, value in parsed.query.items()
    }
    return parsed.set(query=query).render_as_string(hide_password=True)


@dataclass(frozen=True, slots=True)
class RecordedConfig:
    """A configuration as the trail records it: its values (secrets masked) and their hash."""

    values: dict[str, dict[str, JSONValue]]
    sha256: str

    def changed(self, previous: Mapping[str, object]) -> tuple[list[str], list[str]]:
        """Return (sections, ``section.key`` names) whose values differ from ``previous``."""
        keys: list[str] = []
        names = sorted(set(self.values) | set(previous))
        for name in names:
            old = previous.get(name)
            old_section = old if isinstance(old, Mapping) else {}
            new_section = self.values.get(name, {})
            for key in sorted(set(new_section) | set(old_section)):
                if (
                    key not in new_section
                    or key not in old_section
                    or canonical_json(new_section[key]) != canonical_json(old_section[key])
                ):
                    keys.append(f"{name}.{key}")
        sections = sorted({key.partition(".")[0] for key in keys})
        return sections, keys


def recorded_config(config: DeploymentConfig) -> RecordedConfig:
    """Return ``config`` as the trail records it (see the module notes on secrets).

    Raises
    ------
    ConfigError
        If a value is of a type the trail cannot hold (a programming error).
    """
    values: dict[str, dict[str, JSONValue]] = {}
    for section_field in fields(config):
        section = getattr(config, section_field.name)
        entries: dict[str, JSONValue] = {}
        for key_field in fields(section):
            value = getattr(section, key_field.name)
            if section_field.name == "server" and key_field.name == "database_url":
                value = _redacted_url(value)
            entries[key_field.name] = _json_value(value)
        values[section_field.name] = entries
    digest = hashlib.sha256(canonical_json(values).encode("utf-8")).hexdigest()
    return RecordedConfig(values=values, sha256=digest)


def _last_loaded(session: Session) -> tuple[int, Mapping[str, object]] | None:
    row = session.execute(
        select(AuditRecordRow.seq, AuditRecordRow.payload)
        .where(AuditRecordRow.kind == AuditEventKind.CONFIG_LOADED.value)
        .order_by(AuditRecordRow.seq.desc())
        .limit(1)
    ).one_or_none()
    if row is None:
        return None
    seq, text = row
    try:
        payload = parse_canonical(text)
    except ConfigError:
        payload = None
    if not isinstance(payload, Mapping):
        # A damaged record is for `fedge audit verify` to name; compare with nothing.
        logger.warning("the config.loaded record %d is damaged; not compared", seq)
        return None
    return seq, payload


def record_config(
    audit: AuditLog, config: DeploymentConfig, *, run_id: str | None = None
) -> list[AuditEvent]:
    """Record ``config.loaded``, preceded by ``config.changed`` if it differs from the last.

    Both are appended in one transaction, so the comparison is with the
    newest ``config.loaded`` at the moment of writing.

    Returns
    -------
    list of AuditEvent
        The events appended (``config.changed`` first when there is one).

    Raises
    ------
    StorageError
        If the database refuses the write.
    """
    record = recorded_config(config)

    def work(session: Session) -> list[AuditEvent]:
        events: list[AuditEvent] = []
        last = _last_loaded(session)
        if last is not None:
            seq, payload = last
            previous_sha = payload.get("config_sha256")
            if previous_sha != record.sha256:
                previous_values = payload.get("config")
                sections, keys = record.changed(
                    previous_values if isinstance(previous_values, Mapping) else {}
                )
                events.append(
                    audit.append_in(
                        session,
                        AuditEventKind.CONFIG_CHANGED,
                        {
                            "previous_sha256": previous_sha
                            if isinstance(previous_sha, str)
                            else None,
                            "config_sha256": record.sha256,
                            "previous_seq": seq,
                            "changed_sections": sections,
                            "changed_keys": keys,
                        },
                        run_id=run_id,
                    )
                )
        events.append(
            audit.append_in(
                session,
                AuditEventKind.CONFIG_LOADED,
                {"config_sha256": record.sha256, "config": record.values},
                run_id=run_id,
            )
        )
        return events

    last_error: Exception | None = None
    for attempt in range(_ATTEMPTS):
        try:
            with Session(audit.engine) as session, session.begin():
                return work(session)
        except (IntegrityError, OperationalError) as exc:
            last_error = exc  # lost the audit head to a concurrent writer: try again
            time.sleep(0.005 * (attempt + 1))
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot record the configuration: {exc}") from exc
    raise StorageError(f"cannot record the configuration: {last_error}")


@dataclass(frozen=True, slots=True, kw_only=True)
class NewKey:
    """One key ``fedge server init`` made, named by public information only.

    ``key_id`` and ``public_key`` name a signing key, ``fingerprint_sha256``
    and ``not_after`` a certificate; a shared secret has none of them (its
    hash is not recorded either).
    """

    purpose: str
    algorithm: str
    key_id: str | None = None
    public_key: str | None = None
    fingerprint_sha256: str | None = None
    not_after: datetime | None = None

    def payload(self) -> dict[str, JSONValue]:
        """Return the ``key.created`` payload of this key."""
        return {
            "purpose": self.purpose,
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "public_key": self.public_key,
            "fingerprint_sha256": self.fingerprint_sha256,
            "not_after": None if self.not_after is None else self.not_after.isoformat(),
        }


def record_keys(audit: AuditLog, keys: Sequence[NewKey], *, created_by: str) -> list[AuditEvent]:
    """Append one ``key.created`` event per key, all in one transaction.

    Raises
    ------
    StorageError
        If the database refuses the write.
    """
    try:
        with Session(audit.engine) as session, session.begin():
            return [
                audit.append_in(
                    session,
                    AuditEventKind.KEY_CREATED,
                    {**key.payload(), "created_by": created_by},
                )
                for key in keys
            ]
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot record the new keys: {exc}") from exc
