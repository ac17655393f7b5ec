"""Canonical JSON bytes and the UTC clock shared by the device runtime's modules."""

from __future__ import annotations

import json
from datetime import UTC, datetime

__all__ = ["canonical_bytes", "utc_now"]


def canonical_bytes(value: object) -> bytes:
    """Return ``value`` as JSON with sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def utc_now() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)
