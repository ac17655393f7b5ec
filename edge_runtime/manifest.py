"""Signed manifests: which artefacts make up one version of a model.

The format lives on the device side of the import graph: the store
(:mod:`fl_server.store`) signs manifests, edge devices verify them before they
fetch or load a byte. A manifest names each artefact by its SHA-256
and is signed with the store's Ed25519 key over its canonical JSON bytes, so an
edge device that trusts the store's public key can check a whole model version
(every file, its format and precision, and the version lineage) offline.

Notes
-----
The canonical form is JSON with sorted keys, no whitespace, ASCII only and no
NaN or infinity; :meth:`Manifest.from_json` re-validates every field, and the
signature is checked against the bytes re-serialised from the parsed manifest,
so a field the parser would drop or change can never slip past a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime._json import canonical_bytes as _canonical
from fedge.errors import ConfigError, FedgeError

__all__ = [
    "OFFER_KEY",
    "SIGNING_CONTEXT",
    "ArtefactEntry",
    "ArtefactFormat",
    "ArtefactOffer",
    "Manifest",
    "ManifestInvalid",
    "OfferStatus",
    "Precision",
    "SignedManifest",
    "check_digest",
    "key_id_for",
    "offer_of",
    "offered_names",
    "verify_manifest",
]

# Domain separation: the store key signs manifests of this format and nothing else.
SIGNING_CONTEXT = b"fedge/manifest/v1\n"

_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)")
_PUBLIC_KEY_BYTES = 32
_MANIFEST_KEYS = frozenset({"model", "version", "parent", "artefacts", "metadata", "created_at"})
_ARTEFACT_KEYS = frozenset({"name", "digest", "size", "format", "precision"})
_SIGNED_KEYS = frozenset({"manifest", "signature", "key_id"})
_OFFER_FIELDS = frozenset({"status", "quality"})

# The metadata key under which a manifest signs, for each artefact, whether devices are
# offered it and what it measured. Inside the signature, so a database edit can neither
# move devices off a variant (flip it to rejected) nor dress up its accuracy.
OFFER_KEY = "offer"


class ArtefactFormat(Enum):
    """How an artefact's bytes are encoded."""

    NPZ = "npz"
    ONNX = "onnx"
    JSON = "json"


class Precision(Enum):
    """The numeric precision of an artefact's weights."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class OfferStatus(Enum):
    """Whether devices are offered an artefact (a rejected one is recorded, never offered)."""

    OFFERED = "offered"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ArtefactOffer:
    """The signed status and measured quality of one artefact."""

    status: OfferStatus
    quality: Mapping[str, float]


class ManifestInvalid(FedgeError):  # noqa: N818 - reads as what happened
    """A signed manifest does not verify: wrong key, wrong key id or bad signature.

    Deliberately not a :class:`~fedge.errors.StorageError` (an ``OSError``):
    a forged or tampered manifest is an integrity failure, and code that retries
    or skips unreadable files on ``OSError`` must never swallow it.
    """


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None or value in {".", ".."}:
        raise ConfigError(f"{what} must match [A-Za-z0-9_.-]{{1,64}} and not be '.' or '..'")
    return value


def _check_int(what: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an int >= {minimum}, got {value!r:.40}")
    return value


def _plain(value: Any) -> Any:
    """Thaw a (possibly frozen) JSON value into dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    return value


def _enum(kind: type[ArtefactFormat] | type[Precision], value: object) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise ConfigError(f"{kind.__name__} must be one of {allowed}, got {value!r:.40}") from None


def _fields(what: str, raw: object, expected: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{what} must be a JSON object")
    if set(raw) != expected:
        raise ConfigError(
            f"{what} must have exactly the keys {sorted(expected)}, got {sorted(map(str, raw))}"
        )
    return raw


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtefactEntry:
    """One file of a model version, named by its SHA-256."""

    name: str
    digest: str
    size: int
    format: ArtefactFormat
    precision: Precision

    def __post_init__(self) -> None:
        _check_name("artefact name", self.name)
        check_digest(self.digest)
        _check_int("artefact size", self.size, 0)
        if not isinstance(self.format, ArtefactFormat):
            raise ConfigError(f"artefact format must be an ArtefactFormat, got {self.format!r:.40}")
        if not isinstance(self.precision, Precision):
            raise ConfigError(f"artefact precision must be a Precision, got {self.precision!r:.40}")

    def to_json(self) -> dict[str, Any]:
        """Return the entry as JSON-ready values (enums by value)."""
        return {
            "name": self.name,
            "digest": self.digest,
            "size": self.size,
            "format": self.format.value,
            "precision": self.precision.value,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ArtefactEntry:
        """Parse and validate an entry read from the network or disk."""
        raw = _fields("an artefact", raw, _ARTEFACT_KEYS)
        return cls(
            name=raw["name"],
            digest=raw["digest"],
            size=raw["size"],
            format=_enum(ArtefactFormat, raw["format"]),
            precision=_enum(Precision, raw["precision"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """One version of a model: its artefacts, lineage and free-form metadata.

    ``metadata`` is deep-frozen on construction (mappings become read-only,
    lists become tuples), so a signed manifest cannot change after signing.
    """

    model: str
    version: int
    parent: int | None
    artefacts: tuple[ArtefactEntry, ...]
    metadata: Mapping[str, Any] = field(hash=False)
    created_at: str

    def __post_init__(self) -> None:
        _check_name("model name", self.model)
        _check_int("version", self.version, 1)
        if self.parent is not None:
            _check_int("parent", self.parent, 1)
            if self.parent >= self.version:
                raise ConfigError(f"parent {self.parent} must be < version {self.version}")
        if not isinstance(self.artefacts, tuple) or not self.artefacts:
            raise ConfigError("artefacts must be a non-empty tuple of ArtefactEntry")
        if not all(isinstance(entry, ArtefactEntry) for entry in self.artefacts):
            raise ConfigError("artefacts must be a non-empty tuple of ArtefactEntry")
        names = [entry.name for entry in self.artefacts]
        if len(set(names)) != len(names):
            raise ConfigError(f"artefact names must be unique, got {sorted(names)}")
        object.__setattr__(self, "metadata", _frozen(_check_metadata(self.metadata)))
        if OFFER_KEY in self.metadata:
            _parse_offer(self.metadata[OFFER_KEY], names)
        _check_created_at(self.created_at)

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as plain JSON-ready values."""
        return {
            "model": self.model,
            "version": self.version,
            "parent": self.parent,
            "artefacts": [entry.to_json() for entry in self.artefacts],
            "metadata": _plain(self.metadata),
            "created_at": self.created_at,
        }

    def canonical_bytes(self) -> bytes:
        """Return the bytes that are signed: sorted-key, compact, ASCII JSON."""
        return _canonical(self.to_json())

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        """Parse and validate a manifest read from the network or disk.

        Raises
        ------
        ConfigError
            If a key is missing or unknown, or any field is malformed.
        """
        raw = _fields("a manifest", raw, _MANIFEST_KEYS)
        artefacts = raw["artefacts"]
        if not isinstance(artefacts, list):
            raise ConfigError("artefacts must be a JSON array")
        return cls(
            model=raw["model"],
            version=raw["version"],
            parent=raw["parent"],
            artefacts=tuple(ArtefactEntry.from_json(entry) for entry in artefacts),
            metadata=raw["metadata"],
            created_at=raw["created_at"],
        )


def _check_metadata(metadata: object) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise ConfigError("metadata must be a mapping")
    plain = _plain(metadata)
    try:
        round_tripped = json.loads(_canonical(plain))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"metadata must be finite, plain JSON: {exc}") from None
    if round_tripped != plain:  # e.g. a non-string key, which JSON would turn into one
        raise ConfigError("metadata must be plain JSON (string keys, no NaN or infinity)")
    return plain  # type: ignore[no-any-return]


def _parse_offer(raw: object, names: list[str]) -> dict[str, ArtefactOffer]:
    """Validate the signed offer: one entry per artefact, a known status, finite numbers."""
    if not isinstance(raw, Mapping) or sorted(raw) != sorted(names):
        raise ConfigError(
            f"metadata.{OFFER_KEY} must name exactly the artefacts {sorted(names)}, "
            f"got {sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__}"
        )
    offers: dict[str, ArtefactOffer] = {}
    for name, raw_entry in raw.items():
        entry = _fields(f"metadata.{OFFER_KEY}.{name}", raw_entry, _OFFER_FIELDS)
        try:
            status = OfferStatus(entry["status"])
        except ValueError:
            raise ConfigError(
                f"metadata.{OFFER_KEY}.{name}.status must be offered or rejected, "
                f"got {entry['status']!r:.40}"
            ) from None
        quality = entry["quality"]
        if not isinstance(quality, Mapping) or not all(
            isinstance(value, int | float) and not isinstance(value, bool)
            for value in quality.values()
        ):
            raise ConfigError(f"metadata.{OFFER_KEY}.{name}.quality must map names to numbers")
        offers[name] = ArtefactOffer(
            status, MappingProxyType({str(k): float(v) for k, v in quality.items()})
        )
    return offers


def offer_of(manifest: Manifest) -> dict[str, ArtefactOffer] | None:
    """Return each artefact's signed status and quality; ``None`` for a manifest without them.

    A manifest signed before fedge put the offer inside the signature has none:
    its statuses live only in the store's database (unsigned).
    """
    if OFFER_KEY not in manifest.metadata:
        return None
    return _parse_offer(manifest.metadata[OFFER_KEY], [a.name for a in manifest.artefacts])


def offered_names(manifest: Manifest) -> list[str] | None:
    """Return the names of the artefacts the signed manifest offers (``None``: not signed)."""
    offers = offer_of(manifest)
    if offers is None:
        return None
    return [a.name for a in manifest.artefacts if offers[a.name].status is OfferStatus.OFFERED]


def _check_created_at(created_at: object) -> None:
    message = (
        f"created_at must be an ISO 8601 UTC time like 2026-01-31T12:00:00Z, got {created_at!r:.40}"
    )
    if not isinstance(created_at, str) or _CREATED_AT.fullmatch(created_at) is None:
        raise ConfigError(message)
    try:
        moment = datetime.fromisoformat(created_at)
    except ValueError:
        raise ConfigError(message) from None
    if moment.utcoffset() != timedelta(0):
        raise ConfigError(message)


def key_id_for(public_key: bytes) -> str:
    """Return the key id: the first 16 hex digits of SHA-256 of the raw 32-byte key."""
    if not isinstance(public_key, bytes) or len(public_key) != _PUBLIC_KEY_BYTES:
        raise ConfigError(f"an Ed25519 public key is {_PUBLIC_KEY_BYTES} raw bytes")
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A manifest with the store's Ed25519 signature over its canonical bytes."""

    manifest: Manifest
    signature: bytes
    key_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, Manifest):
            raise ConfigError("manifest must be a Manifest")
        if not isinstance(self.signature, bytes):
            raise ConfigError("signature must be bytes")
        if not isinstance(self.key_id, str) or _KEY_ID.fullmatch(self.key_id) is None:
            raise ConfigError(
                f"key_id must be 16 lowercase hex characters, got {self.key_id!r:.40}"
            )

    def to_json(self) -> dict[str, Any]:
        """Return JSON-ready values; the signature is standard base64."""
        return {
            "manifest": self.manifest.to_json(),
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "key_id": self.key_id,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SignedManifest:
        """Parse a signed manifest (this does not verify it: see :func:`verify_manifest`)."""
        raw = _fields("a signed manifest", raw, _SIGNED_KEYS)
        encoded = raw["signature"]
        if not isinstance(encoded, str):
            raise ConfigError("signature must be a base64 string")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("signature is not valid base64") from None
        return cls(Manifest.from_json(raw["manifest"]), signature, raw["key_id"])


def verify_manifest(signed: SignedManifest, public_key: bytes) -> Manifest:
    """Return the manifest if ``public_key`` signed it; raise :class:`ManifestInvalid` if not.

    Raises
    ------
    ConfigError
        If ``public_key`` is not 32 raw bytes.
    ManifestInvalid
        If the key id differs or the signature does not verify.
    """
    expected = key_id_for(public_key)
    if signed.key_id != expected:
        raise ManifestInvalid(f"manifest is signed by key {signed.key_id}, expected {expected}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signed.signature, SIGNING_CONTEXT + signed.manifest.canonical_bytes()
        )
    except (InvalidSignature, ValueError):
        raise ManifestInvalid("manifest signature does not verify") from None
    return signed.manifest


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a SHA-256 in 64 lowercase hex characters.

    Raises
    ------
    ConfigError
        For anything else: this is the guard that keeps paths inside the store.
    """
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise ConfigError(
            f"a blob digest is 64 lowercase hex characters (SHA-256), got {_preview(digest)}"
        )
    return digest
