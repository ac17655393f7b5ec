"""Signed device events: the envelope a device publishes and the cloud verifies, and its sequence.

A device reports health, drift, telemetry and model changes as :class:`DeviceEvent`
envelopes (``fedge/device-event/v1``), one canonical JSON object each::

    {"body": {...}, "certificate": {"enrolment_id": ..., "public_key": <hex>,
     "signature": <hex>[, "expires_at": <unix s>]}, "device": "dev-...",
     "format": "fedge/device-event/v1", "kind": "health", "seq": 17,
     "signature": <hex>, "time": 1767225600.25}

``signature`` is the device's Ed25519 signature, made with its enrolment identity
(:class:`secure_agg.identity.NodeIdentity`), over ``fedge/device-event/v1 NUL``
followed by the canonical JSON (:func:`edge_runtime._json.canonical_bytes`) of every
other field. The certificate is the enrolment authority's, as in
:mod:`secure_agg.request_auth`: a verifier that pins the authority's key needs
nothing else to know which enrolled device spoke.

Notes
-----
The label keeps an event signature from being valid as any other fedge signature
(a signed request, a secure-aggregation message) and vice versa. ``seq`` starts at
1 and grows strictly per device (:class:`EventSequence` persists it, so a restart
never reuses a number; a crash may skip some); the cloud stores one event per
(device, seq), which makes delivery idempotent. ``time`` is the device's clock and
is only reported, never trusted for ordering or windows.

A payload is accepted only in canonical form (sorted keys, no whitespace, ASCII),
at most :data:`MAX_EVENT_BYTES` bytes, with no duplicated key and no unknown field;
so one event has exactly one byte string, and the bytes the device signed are the
bytes the cloud checks.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edge_runtime._json import canonical_bytes
from edge_runtime.durable import write_atomically
from fedge.errors import ConfigError, FedgeError, StorageError
from secure_agg.crypto import KEY_BYTES, verify_signature
from secure_agg.errors import CryptoError
from secure_agg.identity import MAX_EXPIRES_AT, IdentityCertificate, NodeIdentity

__all__ = [
    "EVENT_FORMAT",
    "MAX_BODY_BYTES",
    "MAX_EVENT_BYTES",
    "MAX_SEQ",
    "DeviceEvent",
    "EventKind",
    "EventMalformed",
    "EventSequence",
    "check_device_id",
    "parse_event",
    "sign_event",
    "verify_event",
]

EVENT_FORMAT = "fedge/device-event/v1"
SIGNATURE_LABEL = EVENT_FORMAT.encode("ascii") + b"\x00"
MAX_EVENT_BYTES = 16_384
# The envelope around a body (ids, keys, two signatures) takes under 1 KiB, so a body
# of 15 KiB keeps every event within the 16 KiB an outbox record and the cloud accept.
MAX_BODY_BYTES = 15_360
MAX_SEQ = (1 << 63) - 1  # the cloud stores seq in a signed 64-bit column
_SIGNATURE_BYTES = 64
_FIELDS = frozenset({"body", "certificate", "device", "format", "kind", "seq", "signature", "time"})
_CERTIFICATE_FIELDS = frozenset({"enrolment_id", "public_key", "signature"})
# A device id becomes one MQTT topic level: no '/', '+', '#', NUL or spaces.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX = re.compile(r"[0-9a-f]*")
_SEQUENCE_FORMAT = "fedge/device-event-seq/v1"


class EventKind(Enum):
    """What an event reports. Values are stable strings stored by the cloud."""

    HEALTH = "health"
    DRIFT = "drift"
    TELEMETRY = "telemetry"
    MODEL_INSTALLED = "model_installed"
    MODEL_ROLLED_BACK = "model_rolled_back"
    CRASH = "crash"
    DEVICE_PROFILE = "device_profile"
    EVENTS_DROPPED = "events_dropped"


class EventMalformed(FedgeError, ValueError):  # noqa: N818 - reads as what happened
    """An event envelope is not well formed; the message says which field and why."""


def check_device_id(device: object) -> str:
    """Return ``device`` if it can name a device in an event and an MQTT topic.

    Raises
    ------
    EventMalformed
        If it is not 1..128 characters of letters, digits, ``._-`` starting with a
        letter or digit.
    """
    if not isinstance(device, str) or not _DEVICE_ID.fullmatch(device):
        raise EventMalformed(
            "a device id has 1..128 characters (letters, digits, '._-', starting with a "
            f"letter or digit), got {device!r:.60}"
        )
    return device


def _check_body(body: object) -> bytes:
    if not isinstance(body, dict):
        raise EventMalformed(f"body must be a JSON object, got {type(body).__name__}")
    try:
        encoded = canonical_bytes(body)
    except (TypeError, ValueError) as error:
        raise EventMalformed(f"body must be finite, plain JSON: {error}") from None
    except RecursionError:
        raise EventMalformed("body is nested too deeply") from None
    if len(encoded) > MAX_BODY_BYTES:
        raise EventMalformed(
            f"body has {len(encoded)} bytes of canonical JSON, more than {MAX_BODY_BYTES}"
        )
    return encoded


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceEvent:
    """One signed event of one device (see the module notes for the wire form).

    Parameters
    ----------
    device
        The device's enrolment id; equal to ``certificate.enrolment_id`` in an event
        that verifies.
    seq
        Its sequence number, 1..``MAX_SEQ``, strictly increasing per device.
    kind
        What it reports.
    time
        When the device made it, Unix seconds on the device's clock (finite, > 0).
    body_json
        The body, a JSON object, as canonical JSON bytes (at most ``MAX_BODY_BYTES``).
    certificate
        The enrolment authority's certificate of the signing key.
    signature
        The device's Ed25519 signature (64 bytes) over :meth:`signed_message`.

    Raises
    ------
    EventMalformed
        If a field has the wrong type or is out of range.
    """

    device: str
    seq: int
    kind: EventKind
    time: float
    body_json: bytes
    certificate: IdentityCertificate
    signature: bytes

    def __post_init__(self) -> None:
        check_device_id(self.device)
        if type(self.seq) is not int or not 1 <= self.seq <= MAX_SEQ:
            raise EventMalformed(f"seq must be an int in 1..{MAX_SEQ}, got {self.seq!r:.40}")
        if not isinstance(self.kind, EventKind):
            raise EventMalformed(f"kind must be an EventKind, got {self.kind!r:.40}")
        if type(self.time) is not float or not math.isfinite(self.time) or self.time <= 0:
            raise EventMalformed(
                f"time must be a finite float of Unix seconds > 0, got {self.time!r:.40}"
            )
        if not isinstance(self.body_json, bytes):
            raise EventMalformed("body_json must be bytes of canonical JSON")
        try:
            body = json.loads(self.body_json)
        except (ValueError, RecursionError):
            raise EventMalformed("body_json is not JSON") from None
        if _check_body(body) != self.body_json:
            raise EventMalformed("body_json is not in canonical form")
        _check_certificate(self.certificate)
        if not isinstance(self.signature, bytes) or len(self.signature) != _SIGNATURE_BYTES:
            raise EventMalformed(f"signature must be {_SIGNATURE_BYTES} bytes")

    @property
    def body(self) -> dict[str, Any]:
        """The body as a fresh dict (the event itself stays immutable)."""
        body: dict[str, Any] = json.loads(self.body_json)
        return body

    def _unsigned(self) -> dict[str, Any]:
        return {
            "body": self.body,
            "certificate": self.certificate.to_json(),
            "device": self.device,
            "format": EVENT_FORMAT,
            "kind": self.kind.value,
            "seq": self.seq,
            "time": self.time,
        }

    def signed_message(self) -> bytes:
        """Return the bytes the device signs: the label, NUL, the canonical unsigned fields."""
        return SIGNATURE_LABEL + canonical_bytes(self._unsigned())

    def to_json(self) -> dict[str, Any]:
        """Return the envelope as a JSON object (bytes as lowercase hex)."""
        return {**self._unsigned(), "signature": self.signature.hex()}

    def to_bytes(self) -> bytes:
        """Return the envelope's canonical JSON: what goes on the wire."""
        return canonical_bytes(self.to_json())


def _check_certificate(certificate: object) -> None:
    if not isinstance(certificate, IdentityCertificate):
        raise EventMalformed("certificate must be an IdentityCertificate")
    check_device_id(certificate.enrolment_id)
    if not isinstance(certificate.public_key, bytes) or len(certificate.public_key) != KEY_BYTES:
        raise EventMalformed(f"certificate public_key must be {KEY_BYTES} bytes")
    if (
        not isinstance(certificate.signature, bytes)
        or len(certificate.signature) != _SIGNATURE_BYTES
    ):
        raise EventMalformed(f"certificate signature must be {_SIGNATURE_BYTES} bytes")
    expires = certificate.expires_at
    if expires is not None and (type(expires) is not int or not 0 < expires <= MAX_EXPIRES_AT):
        raise EventMalformed(f"certificate expires_at must be an int in 1..{MAX_EXPIRES_AT}")


def sign_event(
    identity: NodeIdentity, *, seq: int, kind: EventKind, body: dict[str, Any], time: float
) -> DeviceEvent:
    """Return the event ``identity`` signs, in the name of its enrolment id.

    Raises
    ------
    EventMalformed
        If a field is out of range, the body is not a small plain JSON object or
        the whole envelope would exceed ``MAX_EVENT_BYTES``.
    """
    if not isinstance(identity, NodeIdentity):
        raise ConfigError("identity must be a secure_agg.identity.NodeIdentity")
    time_value = float(time) if type(time) is int else time
    unsigned = DeviceEvent(
        device=identity.certificate.enrolment_id,
        seq=seq,
        kind=kind,
        time=time_value,
        body_json=_check_body(body),
        certificate=identity.certificate,
        signature=bytes(_SIGNATURE_BYTES),
    )
    event = DeviceEvent(
        device=unsigned.device,
        seq=seq,
        kind=kind,
        time=time_value,
        body_json=unsigned.body_json,
        certificate=unsigned.certificate,
        signature=identity.sign(unsigned.signed_message()),
    )
    size = len(event.to_bytes())
    if size > MAX_EVENT_BYTES:
        raise EventMalformed(f"the event has {size} bytes, more than {MAX_EVENT_BYTES}")
    return event


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise EventMalformed(f"duplicate key {key!r:.40}")
        document[key] = value
    return document


def _refuse_constant(name: str) -> None:
    raise EventMalformed(f"{name} is not a JSON number")


def _hex(document: dict[str, Any], key: str, size: int, where: str) -> bytes:
    value = document[key]
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        raise EventMalformed(f"{where}{key} must be {2 * size} lowercase hex digits")
    return bytes.fromhex(value)


def _parse_certificate(raw: object) -> IdentityCertificate:
    if not isinstance(raw, dict):
        raise EventMalformed("certificate must be a JSON object")
    keys = set(raw)
    if not keys >= _CERTIFICATE_FIELDS or keys - _CERTIFICATE_FIELDS - {"expires_at"}:
        raise EventMalformed(
            "certificate must have enrolment_id, public_key, signature and optionally "
            f"expires_at, got {sorted(keys)!r:.120}"
        )
    expires = raw.get("expires_at")
    if expires is not None and (type(expires) is not int or not 0 < expires <= MAX_EXPIRES_AT):
        raise EventMalformed(f"certificate expires_at must be an int in 1..{MAX_EXPIRES_AT}")
    return IdentityCertificate(
        enrolment_id=check_device_id(raw["enrolment_id"]),
        public_key=_hex(raw, "public_key", KEY_BYTES, "certificate "),
        signature=_hex(raw, "signature", _SIGNATURE_BYTES, "certificate "),
        expires_at=expires,
    )


def parse_event(payload: bytes) -> DeviceEvent:
    """Return the event of a wire payload; nothing is verified cryptographically here.

    Raises
    ------
    EventMalformed
        If the payload is too large, not canonical JSON, repeats a key, lacks a field,
        has an unknown one, or a field has the wrong type or is out of range; the
        message names the field.
    """
    if not isinstance(payload, bytes | bytearray):
        raise EventMalformed(f"a payload is bytes, got {type(payload).__name__}")
    if len(payload) > MAX_EVENT_BYTES:
        raise EventMalformed(f"the payload has {len(payload)} bytes, more than {MAX_EVENT_BYTES}")
    try:
        document = json.loads(
            bytes(payload), object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except EventMalformed:
        raise
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise EventMalformed(f"the payload is not JSON: {error!s:.80}") from None
    if not isinstance(document, dict):
        raise EventMalformed("the payload must be a JSON object")
    keys = set(document)
    if keys != _FIELDS:
        missing, unknown = sorted(_FIELDS - keys), sorted(keys - _FIELDS)
        raise EventMalformed(f"fields missing {missing!r:.80}, unknown {unknown!r:.80}")
    if document["format"] != EVENT_FORMAT:
        raise EventMalformed(f"format must be {EVENT_FORMAT!r}, got {document['format']!r:.60}")
    try:
        kind = EventKind(document["kind"])
    except (ValueError, TypeError):
        raise EventMalformed(f"unknown kind {document['kind']!r:.40}") from None
    event = DeviceEvent(
        device=check_device_id(document["device"]),
        seq=document["seq"],
        kind=kind,
        time=document["time"],
        body_json=_check_body(document["body"]),
        certificate=_parse_certificate(document["certificate"]),
        signature=_hex(document, "signature", _SIGNATURE_BYTES, ""),
    )
    if event.to_bytes() != bytes(payload):
        raise EventMalformed("the payload is not in canonical form (sorted keys, no spaces)")
    return event


def verify_event(event: DeviceEvent, *, authority_public_key: bytes, now: int) -> None:
    """Raise the opaque :class:`CryptoError` unless ``event`` is its device's own.

    Checks that the event names the device its certificate names, that the enrolment
    authority signed the certificate and it is unexpired at ``now`` (the verifier's
    clock, Unix seconds), and that the certified key signed the event.

    Raises
    ------
    CryptoError
        If any of these fails (which one is not said).
    """
    if event.device != event.certificate.enrolment_id:
        raise CryptoError
    event.certificate.verify_at_time(authority_public_key, now)
    verify_signature(event.certificate.public_key, event.signature, event.signed_message())


class EventSequence:
    """Hand out one device's event sequence numbers: 1, 2, 3, ... never one twice.

    Parameters
    ----------
    path
        The state file (JSON, replaced atomically); created on first use.
    device
        The device it counts for; a state file of another device is refused.
    lease
        Numbers reserved per write of the state file, >= 1. A restart continues
        after the last reserved number, so a crash skips at most ``lease - 1``
        numbers; one fsynced write per ``lease`` events instead of one per event.

    Raises
    ------
    ConfigError
        If ``lease`` is below 1 or ``device`` is not a device id.
    StorageError
        If the state file is corrupt, belongs to another device or cannot be written.
    """

    def __init__(self, path: Path, device: str, *, lease: int = 64) -> None:
        if type(lease) is not int or lease < 1:
            raise ConfigError(f"lease must be an int >= 1, got {lease!r:.40}")
        try:
            self._device = check_device_id(device)
        except EventMalformed as error:
            raise ConfigError(str(error)) from None
        self._path = Path(path)
        self._lease = lease
        self._lock = threading.Lock()
        self._reserved = self._read()
        self._last = self._reserved  # numbers up to here may have been handed out

    def _read(self) -> int:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as error:
            raise StorageError(f"cannot read event sequence {self._path}: {error}") from error
        try:
            state = json.loads(raw)
            valid = (
                isinstance(state, dict)
                and set(state) == {"format", "device", "reserved"}
                and state["format"] == _SEQUENCE_FORMAT
                and type(state["reserved"]) is int
                and 0 <= state["reserved"] <= MAX_SEQ
            )
        except ValueError:
            valid = False
        if not valid:
            raise StorageError(f"event sequence {self._path} is corrupt")
        if state["device"] != self._device:
            raise StorageError(
                f"event sequence {self._path} belongs to device {state['device']!r:.60}, "
                f"not {self._device!r}"
            )
        reserved: int = state["reserved"]
        return reserved

    @property
    def last(self) -> int:
        """The highest number handed out (or skipped) so far; 0 before the first."""
        return self._last

    def next(self) -> int:
        """Return the next number, reserving a new lease on disk first when needed.

        Raises
        ------
        StorageError
            If the lease cannot be written; no number is handed out then.
        """
        with self._lock:
            number = self._last + 1
            if number > MAX_SEQ:
                raise StorageError("the event sequence is exhausted")
            if number > self._reserved:
                reserved = min(self._reserved + self._lease, MAX_SEQ)
                state = {"device": self._device, "format": _SEQUENCE_FORMAT, "reserved": reserved}
                try:
                    self._path.parent.mkdir(parents=True, exist_ok=True)
                    write_atomically(self._path, canonical_bytes(state), mode=0o600)
                except OSError as error:
                    raise StorageError(f"cannot reserve event sequence numbers: {error}") from error
                self._reserved = reserved
            self._last = number
            return number
