"""The enrolment authority's signed revocation list: build it (cloud) and verify it (device).

Pure: stdlib and cryptography (through :mod:`secure_agg.crypto`); every time is a
``now=`` parameter, never the wall clock. Devices verify lists here with the
authority key pinned in their policy; :mod:`fl_server.pki` re-exports these names.

Notes
-----
Format (version 1). :func:`build_revocation_list` returns the UTF-8 JSON envelope
``{"body": BODY, "signature": HEX}``, where ``BODY`` is a string holding canonical
JSON (sorted keys, no spaces, ASCII)::

    {"format": "fedge-revocation-list/v1", "issued_at": ISO-8601 UTC,
     "revoked": [{"device_id": ..., "revoked_at": ...}, ...] (sorted by id),
     "sequence": N}

and ``HEX`` is the Ed25519 signature of ``REVOCATION_LIST_LABEL + BODY`` by the
authority. The label keeps a revocation-list signature from ever being valid as
an identity certificate or any other authority signature, and vice versa.

The sequence number orders lists: the registry issues a larger number whenever
the revoked set grows, and only ever one revoked set per number. A device keeps
the largest sequence it has accepted and passes it as ``min_sequence``, so a
server (the adversary) cannot replay an older list to un-revoke a device; a list
issued in the future (beyond a small clock skew) is refused too, and ``max_age``
bounds how stale a list may be. Every failure (bad signature, malformed body,
replayed or stale list) raises the same opaque :class:`~secure_agg.errors.CryptoError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fedge.errors import ConfigError
from secure_agg.crypto import sign, verify_signature
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority

__all__ = [
    "CLOCK_SKEW",
    "MAX_LIST_BYTES",
    "REVOCATION_LIST_FORMAT",
    "REVOCATION_LIST_LABEL",
    "RevocationList",
    "RevokedDevice",
    "build_revocation_list",
    "verify_revocation_list",
]

REVOCATION_LIST_FORMAT = "fedge-revocation-list/v1"
REVOCATION_LIST_LABEL = b"fedge/revocation-list/v1\x00"
MAX_LIST_BYTES = 16 * 1024 * 1024
# A verifier's clock may run a little behind the authority's: a list "issued" up to
# this far in the verifier's future is still accepted.
CLOCK_SKEW = timedelta(minutes=5)


def _check_now(now: datetime) -> datetime:
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ConfigError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class RevokedDevice:
    """One entry of a revocation list: a device's enrolment id and when it was revoked."""

    device_id: str
    revoked_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationList:
    """A verified revocation list: its order number, issue time and revoked devices."""

    sequence: int
    issued_at: datetime
    revoked: tuple[RevokedDevice, ...]

    @property
    def device_ids(self) -> frozenset[str]:
        """The enrolment ids of every revoked device."""
        return frozenset(entry.device_id for entry in self.revoked)


def _iso(moment: datetime) -> str:
    return _check_now(moment).isoformat(timespec="microseconds")


def build_revocation_list(
    authority: EnrolmentAuthority,
    revoked: Iterable[RevokedDevice],
    *,
    sequence: int,
    now: datetime,
) -> bytes:
    """Sign the list of ``revoked`` devices with the enrolment authority's key.

    Parameters
    ----------
    authority
        The secure-aggregation enrolment authority (the key devices pin).
    revoked
        Every revoked device; ids must be unique.
    sequence
        The list's order number (>= 0); see the module notes.
    now
        The issue time (timezone-aware).

    Returns
    -------
    bytes
        The signed envelope described in the module notes.

    Raises
    ------
    ConfigError
        If the sequence is negative, an id repeats or is empty, or a time is naive.
    """
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise ConfigError(f"sequence must be a non-negative integer, got {sequence!r}")
    entries = sorted(revoked, key=lambda entry: entry.device_id)
    ids = [entry.device_id for entry in entries]
    if len(set(ids)) != len(ids):
        raise ConfigError("a device appears twice in the revocation list")
    if not all(isinstance(device_id, str) and device_id for device_id in ids):
        raise ConfigError("a revoked device id is empty")
    body = json.dumps(
        {
            "format": REVOCATION_LIST_FORMAT,
            "issued_at": _iso(now),
            "revoked": [
                {"device_id": entry.device_id, "revoked_at": _iso(entry.revoked_at)}
                for entry in entries
            ],
            "sequence": sequence,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    signature = sign(authority.signing_seed, REVOCATION_LIST_LABEL + body.encode("ascii"))
    envelope = {"body": body, "signature": signature.hex()}
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("ascii")


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise CryptoError
    moment = datetime.fromisoformat(value)  # ValueError is turned opaque by the caller
    if moment.tzinfo is None:
        raise CryptoError
    return moment


def _parse_body(body: str) -> RevocationList:
    content = json.loads(body)
    if not isinstance(content, dict) or set(content) != {
        "format",
        "issued_at",
        "revoked",
        "sequence",
    }:
        raise CryptoError
    sequence = content["sequence"]
    if content["format"] != REVOCATION_LIST_FORMAT or type(sequence) is not int or sequence < 0:
        raise CryptoError
    if not isinstance(content["revoked"], list):
        raise CryptoError
    entries: list[RevokedDevice] = []
    for item in content["revoked"]:
        if not isinstance(item, dict) or set(item) != {"device_id", "revoked_at"}:
            raise CryptoError
        if not isinstance(item["device_id"], str) or not item["device_id"]:
            raise CryptoError
        entries.append(
            RevokedDevice(device_id=item["device_id"], revoked_at=_parse_time(item["revoked_at"]))
        )
    if len({entry.device_id for entry in entries}) != len(entries):
        raise CryptoError
    return RevocationList(
        sequence=sequence, issued_at=_parse_time(content["issued_at"]), revoked=tuple(entries)
    )


def verify_revocation_list(
    data: bytes,
    authority_public_key: bytes,
    *,
    now: datetime,
    min_sequence: int = 0,
    max_age: timedelta | None = None,
) -> RevocationList:
    """Check a revocation list's signature and freshness; return what it revokes.

    Parameters
    ----------
    data
        The envelope from :func:`build_revocation_list`.
    authority_public_key
        The enrolment authority's raw Ed25519 key, as pinned in the device policy.
    now
        The verifier's own time (timezone-aware); never a time the server sent.
    min_sequence
        The least sequence accepted: a device passes the largest it accepted
        before, so an older list (a replay that would un-revoke a device) is refused.
    max_age
        When given, a list issued longer ago than this is refused.

    Returns
    -------
    RevocationList
        The verified list; ``device_ids`` is the revoked set.

    Raises
    ------
    CryptoError
        Opaquely, if the signature, format, sequence or issue time is not acceptable.
    ConfigError
        If ``now`` is naive or ``min_sequence`` is not an integer (a caller bug,
        not an attack).

    Notes
    -----
    The signature is checked before the body is parsed: an unsigned body never
    reaches the JSON parser beyond the envelope.
    """
    moment = _check_now(now)
    if isinstance(min_sequence, bool) or not isinstance(min_sequence, int):
        raise ConfigError(f"min_sequence must be an integer, got {min_sequence!r}")
    try:
        if not isinstance(data, bytes) or len(data) > MAX_LIST_BYTES:
            raise CryptoError
        envelope = json.loads(data)
        if not isinstance(envelope, dict) or set(envelope) != {"body", "signature"}:
            raise CryptoError
        body, signature = envelope["body"], envelope["signature"]
        if not isinstance(body, str) or not isinstance(signature, str):
            raise CryptoError
        verify_signature(
            authority_public_key,
            bytes.fromhex(signature),
            REVOCATION_LIST_LABEL + body.encode("utf-8"),
        )
        parsed = _parse_body(body)
    except (ValueError, TypeError, UnicodeError, RecursionError) as exc:
        raise CryptoError from exc
    if parsed.sequence < min_sequence or parsed.issued_at > moment + CLOCK_SKEW:
        raise CryptoError
    if max_age is not None and parsed.issued_at < moment - max_age:
        raise CryptoError
    return parsed
