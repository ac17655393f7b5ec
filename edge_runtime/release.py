"""Signed release directives: which version a device should run, and who is in a canary.

The rollout controller (:mod:`fl_server.rollout`) tells the fleet what to run by
a *directive* the store key signs: "model M, version V, for the devices of
rollout R whose cohort bucket is below F", or "roll model M back to version P".
A device checks everything itself before it acts:

- the signature, with the store key it pinned (a forged directive changes nothing);
- the sequence number, which only grows per model: an older directive replayed
  by a hostile server or a cache is refused, so a device never goes back to a
  version the controller has since withdrawn;
- its own cohort membership, from a hash of its own enrolment id and the
  rollout id (:func:`cohort_bucket`): a server cannot put a device in a canary
  cohort the directive does not name, and a device that opted out of canaries
  waits for the fleet-wide stage;
- the direction: a rollout never moves a device to an older version; only a
  ``rollback`` directive does, and only to the version it names (never an
  arbitrary older version).

Cohorts are deterministic and sticky: the same device and rollout always hash
to the same bucket, so a device in the 1 % canary stays in every later stage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime._json import canonical_bytes
from edge_runtime.manifest import ManifestInvalid, key_id_for
from fedge.errors import ConfigError

__all__ = [
    "DIRECTIVE_CONTEXT",
    "DirectiveKind",
    "ReleaseDirective",
    "SignedDirective",
    "cohort_bucket",
    "in_cohort",
    "verify_directive",
]

# Domain separation: a directive signature can never pass as a manifest's, or back.
DIRECTIVE_CONTEXT = b"fedge/release-directive/v1\n"
_COHORT_LABEL = b"fedge/cohort/v1\n"

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ROLLOUT_ID = re.compile(r"[a-z0-9][a-z0-9\-]{0,63}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_KEYS = frozenset(
    {
        "model",
        "version",
        "kind",
        "rollout_id",
        "sequence",
        "cohort_fraction",
        "previous",
        "issued_at",
        "variants",
    }
)
_SIGNED_KEYS = frozenset({"directive", "signature", "key_id"})
_CLASS = re.compile(r"[a-z0-9][a-z0-9\-]{0,31}")
_MAX_VARIANTS = 32


class DirectiveKind(Enum):
    """What a directive asks: move a cohort forward, or the whole fleet back."""

    ROLLOUT = "rollout"
    ROLLBACK = "rollback"


def _int(what: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"directive {what} must be an int >= {minimum}, got {value!r:.40}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseDirective:
    """One signed instruction to the fleet.

    Parameters
    ----------
    model, version
        What to run.
    kind
        ``rollout`` (a cohort moves forward to ``version``) or ``rollback`` (every
        device that left ``version`` goes back to it).
    rollout_id
        The rollout this belongs to (it seeds the cohort hash).
    sequence
        Grows by one with every directive of ``model``; devices refuse anything
        not newer than what they last acted on.
    cohort_fraction
        In (0, 1]: devices whose :func:`cohort_bucket` is below it are in the cohort.
        Always 1 for a rollback.
    previous
        The production version the rollout replaces (what a rollback returns to).
    issued_at
        When the controller issued it (unix seconds).
    variants
        Which artefact each device class should run (``cpu-avx2`` -> the FP32 ONNX
        where INT8 is slower there, ``cpu-vnni`` -> INT8, ...), chosen from what the
        fleet measured; a device of a class not listed uses its own preference.
    """

    model: str
    version: int
    kind: DirectiveKind
    rollout_id: str
    sequence: int
    cohort_fraction: float
    previous: int | None
    issued_at: float
    variants: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or _NAME.fullmatch(self.model) is None:
            raise ConfigError(
                f"directive model must match [A-Za-z0-9_.-]{{1,64}}: {self.model!r:.40}"
            )
        _int("version", self.version, 1)
        _int("sequence", self.sequence, 1)
        if not isinstance(self.kind, DirectiveKind):
            raise ConfigError(f"directive kind must be a DirectiveKind, got {self.kind!r:.40}")
        if not isinstance(self.rollout_id, str) or _ROLLOUT_ID.fullmatch(self.rollout_id) is None:
            raise ConfigError(
                "directive rollout_id must match [a-z0-9][a-z0-9-]{0,63}: "
                f"{self.rollout_id!r:.40}"
            )
        fraction = self.cohort_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not math.isfinite(fraction)
            or not 0 < fraction <= 1
        ):
            raise ConfigError(f"directive cohort_fraction must be in (0, 1], got {fraction!r:.40}")
        if self.previous is not None:
            _int("previous", self.previous, 1)
        if self.kind is DirectiveKind.ROLLBACK and (
            fraction != 1 or self.previous is None or self.previous != self.version
        ):
            raise ConfigError(
                "a rollback directive names the whole fleet (cohort_fraction 1) and returns "
                "to its previous version (version == previous)"
            )
        issued = self.issued_at
        if (
            isinstance(issued, bool)
            or not isinstance(issued, int | float)
            or not math.isfinite(issued)
            or issued < 0
        ):
            raise ConfigError(f"directive issued_at must be unix seconds, got {issued!r:.40}")
        variants = self.variants
        if not isinstance(variants, Mapping) or len(variants) > _MAX_VARIANTS:
            raise ConfigError(f"directive variants must map at most {_MAX_VARIANTS} classes")
        for device_class, artefact in variants.items():
            if not isinstance(device_class, str) or _CLASS.fullmatch(device_class) is None:
                raise ConfigError(f"directive variants: bad device class {device_class!r:.40}")
            if not isinstance(artefact, str) or _NAME.fullmatch(artefact) is None:
                raise ConfigError(f"directive variants: bad artefact name {artefact!r:.40}")
        object.__setattr__(self, "variants", MappingProxyType(dict(variants)))

    def to_json(self) -> dict[str, Any]:
        """Return the directive as JSON values."""
        return {
            "model": self.model,
            "version": self.version,
            "kind": self.kind.value,
            "rollout_id": self.rollout_id,
            "sequence": self.sequence,
            "cohort_fraction": float(self.cohort_fraction),
            "previous": self.previous,
            "issued_at": float(self.issued_at),
            "variants": dict(self.variants),
        }

    def canonical_bytes(self) -> bytes:
        """Return the bytes that are signed."""
        return canonical_bytes(self.to_json())

    @classmethod
    def from_json(cls, raw: object) -> ReleaseDirective:
        """Parse and validate a directive read from the network or disk."""
        if not isinstance(raw, Mapping) or set(raw) != _KEYS:
            got = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
            raise ConfigError(f"a directive must have exactly the keys {sorted(_KEYS)}, got {got}")
        try:
            kind = DirectiveKind(raw["kind"])
        except ValueError:
            raise ConfigError(
                f"directive kind must be rollout or rollback, got {raw['kind']!r:.40}"
            ) from None
        return cls(
            model=raw["model"],
            version=raw["version"],
            kind=kind,
            rollout_id=raw["rollout_id"],
            sequence=raw["sequence"],
            cohort_fraction=raw["cohort_fraction"],
            previous=raw["previous"],
            issued_at=raw["issued_at"],
            variants=raw["variants"],
        )

    def artefact_for(self, device_class: str | None) -> str | None:
        """Return the artefact chosen for ``device_class`` (``None``: the device's own choice)."""
        return None if device_class is None else self.variants.get(device_class)

    def targets(self, device_id: str) -> bool:
        """Say whether ``device_id`` is among the devices this directive addresses."""
        return in_cohort(device_id, self.rollout_id, self.cohort_fraction)


@dataclass(frozen=True, slots=True)
class SignedDirective:
    """A directive and the store key's Ed25519 signature over its canonical bytes."""

    directive: ReleaseDirective
    signature: bytes
    key_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.directive, ReleaseDirective):
            raise ConfigError("directive must be a ReleaseDirective")
        if not isinstance(self.signature, bytes):
            raise ConfigError("signature must be bytes")
        if not isinstance(self.key_id, str) or _KEY_ID.fullmatch(self.key_id) is None:
            raise ConfigError(f"key_id must be 16 lowercase hex characters: {self.key_id!r:.40}")

    def to_json(self) -> dict[str, Any]:
        """Return JSON values; the signature is standard base64."""
        return {
            "directive": self.directive.to_json(),
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "key_id": self.key_id,
        }

    @classmethod
    def from_json(cls, raw: object) -> SignedDirective:
        """Parse a signed directive (this does not verify it: :func:`verify_directive`)."""
        if not isinstance(raw, Mapping) or set(raw) != _SIGNED_KEYS:
            raise ConfigError(
                f"a signed directive must have exactly the keys {sorted(_SIGNED_KEYS)}"
            )
        if not isinstance(raw["signature"], str):
            raise ConfigError("signature must be a base64 string")
        try:
            signature = base64.b64decode(raw["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("signature is not valid base64") from None
        return cls(ReleaseDirective.from_json(raw["directive"]), signature, raw["key_id"])


def verify_directive(signed: SignedDirective, public_key: bytes) -> ReleaseDirective:
    """Return the directive if ``public_key`` signed it; raise :class:`ManifestInvalid` if not."""
    expected = key_id_for(public_key)
    if signed.key_id != expected:
        raise ManifestInvalid(f"directive is signed by key {signed.key_id}, expected {expected}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signed.signature, DIRECTIVE_CONTEXT + signed.directive.canonical_bytes()
        )
    except (InvalidSignature, ValueError):
        raise ManifestInvalid("directive signature does not verify") from None
    return signed.directive


def cohort_bucket(device_id: str, rollout_id: str) -> float:
    """Return the device's sticky position in [0, 1) for one rollout.

    SHA-256 of a label, the rollout id and the device id, read as a 64-bit
    fraction: uniform over devices, independent between rollouts (a device is not
    always the first canary), and computable by the device and the controller alike.
    """
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise ConfigError(f"device id must match [A-Za-z0-9_.:-]{{1,128}}: {device_id!r:.40}")
    if not isinstance(rollout_id, str) or _ROLLOUT_ID.fullmatch(rollout_id) is None:
        raise ConfigError(f"rollout id must match [a-z0-9][a-z0-9-]{{0,63}}: {rollout_id!r:.40}")
    digest = hashlib.sha256(
        _COHORT_LABEL + rollout_id.encode() + b"\n" + device_id.encode()
    ).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_cohort(device_id: str, rollout_id: str, fraction: float) -> bool:
    """Say whether the device is in the first ``fraction`` of the rollout's cohort order."""
    return cohort_bucket(device_id, rollout_id) < fraction
