"""What the model store takes and returns: new artefacts, version metadata, stored versions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.manifest import ArtefactEntry, ArtefactFormat, Manifest, Precision, SignedManifest

__all__ = [
    "ArtefactStatus",
    "ModelVersion",
    "NewArtefact",
    "VerifyReport",
    "VersionInfo",
]


class ArtefactStatus:
    """Whether an artefact may be offered to devices."""

    OFFERED = "offered"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class NewArtefact:
    """An artefact to publish: its bytes (or a file), what it is, how good it measured.

    ``rejected`` artefacts (below their accuracy floor) are recorded, never offered.
    """

    name: str
    data: bytes | Path
    format: ArtefactFormat = ArtefactFormat.NPZ
    precision: Precision = Precision.FP32
    quality: Mapping[str, float] = field(default_factory=dict)
    rejected: bool = False

    @property
    def status(self) -> str:
        """Offered, or rejected (recorded, never offered)."""
        return ArtefactStatus.REJECTED if self.rejected else ArtefactStatus.OFFERED

    def entry(self, *, digest: str, size: int) -> ArtefactEntry:
        """Return the manifest entry of this artefact stored as ``digest``."""
        return ArtefactEntry(
            name=self.name, digest=digest, size=size, format=self.format, precision=self.precision
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionInfo:
    """Searchable metadata of a version (also signed, inside the manifest)."""

    run_id: str | None = None
    server_round: int | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    secure_aggregation: Mapping[str, Any] | None = None
    participants: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the metadata as JSON values."""
        return {
            "run_id": self.run_id,
            "server_round": self.server_round,
            "dp_epsilon": self.dp_epsilon,
            "dp_delta": self.dp_delta,
            "secure_aggregation": None
            if self.secure_aggregation is None
            else dict(self.secure_aggregation),
            "participants": self.participants,
            "metrics": dict(self.metrics),
        }


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A stored version: its signed manifest and the status of each artefact."""

    signed: SignedManifest
    statuses: Mapping[str, str]
    quality: Mapping[str, Mapping[str, float]]
    # False for a version published before statuses were signed (its statuses are the
    # database's word only).
    statuses_signed: bool = True

    @property
    def manifest(self) -> Manifest:
        """The (signed) manifest."""
        return self.signed.manifest

    def offered(self) -> list[ArtefactEntry]:
        """Return the artefacts devices may fetch (rejected variants are never offered)."""
        return [
            a for a in self.manifest.artefacts if self.statuses[a.name] == ArtefactStatus.OFFERED
        ]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :meth:`ModelStore.verify` found: the signature and every artefact."""

    model: str
    version: int
    signature_ok: bool
    artefacts: dict[str, str]
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """True when the signature and every artefact verified."""
        return (
            self.signature_ok
            and self.problem is None
            and all(v == "ok" for v in self.artefacts.values())
        )
