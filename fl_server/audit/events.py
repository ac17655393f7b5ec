"""The typed audit event and its canonical, hashable form."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import TypeAlias

from fedge.errors import ConfigError

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditEventKind",
    "JSONValue",
    "canonical_json",
    "parse_canonical",
    "record_hash",
]

JSONValue: TypeAlias = (
    str | int | float | bool | Sequence["JSONValue"] | Mapping[str, "JSONValue"] | None
)

GENESIS_HASH = "0" * 64


class AuditEventKind(Enum):
    """What happened. Values are stable strings stored in the database."""

    RUN_STARTED = "run.started"
    ROUND_COMPLETED = "round.completed"
    MODEL_SAVED = "model.saved"
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_RESUMED = "run.resumed"
    PRIVACY_SPENT = "privacy.spent"
    LEDGER_ADOPTED = "privacy.ledger_adopted"
    BUDGET_EXHAUSTED = "privacy.budget_exhausted"
    MODEL_PUBLISHED = "store.published"
    ALIAS_MOVED = "store.alias_moved"
    STORE_GC = "store.gc"
    ENROLMENT_TOKENS_CREATED = "enrolment.tokens_created"
    DEVICE_ENROLLED = "device.enrolled"
    DEVICE_NODE_REGISTERED = "device.node_registered"
    DEVICE_REVOKED = "device.revoked"
    ENROLMENT_REFUSED = "enrolment.refused"
    AUTH_FAILED = "auth.failed"
    AUDIT_SUPPRESSED = "audit.suppressed"
    CONFIG_LOADED = "config.loaded"
    CONFIG_CHANGED = "config.changed"
    KEY_CREATED = "key.created"
    # Model release and rollout (issue 15).
    MODEL_DOWNLOADED = "store.downloaded"
    RELEASE_REFUSED = "store.release_refused"
    ROLLBACK_SIGNED = "store.rollback_signed"
    ROLLOUT_STARTED = "rollout.started"
    ROLLOUT_TRANSITION = "rollout.transition"
    DEVICE_EVENTS_REJECTED = "device.events_rejected"
    RETRAINING_REQUESTED = "retraining.requested"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One verified-on-read record of the audit chain."""

    seq: int
    recorded_at: datetime
    kind: AuditEventKind
    run_id: str | None
    payload: Mapping[str, JSONValue]
    prev_hash: str
    record_hash: str


def _check_json(value: object, path: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"audit payload {path} is {value}: only finite numbers are allowed")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"audit payload {path} has a non-string key {key!r}")
            _check_json(item, f"{path}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    raise ConfigError(f"audit payload {path} has type {type(value).__name__}, not JSON")


def canonical_json(value: object) -> str:
    """Serialise ``value`` deterministically: sorted keys, no spaces, finite numbers only.

    Raises
    ------
    ConfigError
        If ``value`` holds anything but JSON types or a non-finite float.
    """
    _check_json(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    mapping: dict[str, object] = {}
    for key, value in pairs:
        if key in mapping:
            raise ConfigError(f"duplicate key {key!r}")
        mapping[key] = value
    return mapping


def _refuse_constant(name: str) -> object:
    raise ConfigError(f"{name} is not a JSON number")


def parse_canonical(text: str) -> object:
    """Parse JSON that :func:`canonical_json` wrote, refusing anything it would not write.

    A duplicated key is refused, not resolved: two parsers that keep the first
    and the last value would read two different payloads under one hash. Text
    that is valid JSON but not in canonical form (spaces, unsorted keys,
    ``NaN``) is refused too, so one stored payload has exactly one reading.

    Raises
    ------
    ConfigError
        If ``text`` is not JSON, repeats a key or is not canonical.
    """
    try:
        value = json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except ConfigError:
        raise
    except ValueError as exc:  # JSONDecodeError is one
        raise ConfigError(f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError("JSON nested too deeply") from exc
    if canonical_json(value) != text:
        raise ConfigError("JSON not in canonical form (sorted keys, no spaces)")
    return value


def record_hash(
    *,
    seq: int,
    recorded_at: str,
    kind: str,
    run_id: str | None,
    payload_json: str,
    prev_hash: str,
) -> str:
    """Return the SHA-256 (hex) of a record's canonical content, its predecessor's hash included.

    Raises
    ------
    ConfigError
        If ``payload_json`` is not canonical JSON (:func:`parse_canonical`).
    """
    content = canonical_json(
        {
            "seq": seq,
            "recorded_at": recorded_at,
            "kind": kind,
            "run_id": run_id,
            "payload": parse_canonical(payload_json),
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(content.encode("utf-8")).hexdigest()
