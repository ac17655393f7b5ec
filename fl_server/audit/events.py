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
    BUDGET_EXHAUSTED = "privacy.budget_exhausted"
    MODEL_PUBLISHED = "store.published"
    ALIAS_MOVED = "store.alias_moved"
    STORE_GC = "store.gc"
    ENROLMENT_TOKENS_CREATED = "enrolment.tokens_created"
    DEVICE_ENROLLED = "device.enrolled"
    DEVICE_NODE_REGISTERED = "device.node_registered"
    DEVICE_REVOKED = "device.revoked"


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


def record_hash(
    *,
    seq: int,
    recorded_at: str,
    kind: str,
    run_id: str | None,
    payload_json: str,
    prev_hash: str,
) -> str:
    """Return the SHA-256 (hex) of a record's canonical content, its predecessor's hash included."""
    content = canonical_json(
        {
            "seq": seq,
            "recorded_at": recorded_at,
            "kind": kind,
            "run_id": run_id,
            "payload": json.loads(payload_json),
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(content.encode("utf-8")).hexdigest()
