"""What the model store takes and returns: new artefacts, version metadata, stored versions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.manifest import ArtefactEntry, ArtefactFormat, Manifest, Precision, SignedManifest
from strategies.dp_mode import DpMode

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
    """Searchable metadata of a version (also signed, inside the manifest).

    ``dp_mode`` is the run's DP mode (:class:`~strategies.dp_mode.DpMode`; ``OFF``
    for a run without DP); ``None``: unknown (published by hand, or by a fedge that
    did not record it yet).
    """

    run_id: str | None = None
    server_round: int | None = None
    dp_mode: DpMode | None = None
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
            "dp_mode": None if self.dp_mode is None else self.dp_mode.value,
            "dp_epsilon": self.dp_epsilon,
            "dp_delta": self.dp_delta,
            "secure_aggregation": None
            if self.secure_aggregation is None
            else dict(self.secure_aggregation),
            "participants": self.participants,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> VersionInfo:
        """Read the metadata back from a (verified) manifest; what is missing reads as unknown.

        A manifest signed before a key existed (``dp_mode``), or holding a value this
        fedge does not know (a DP mode of a newer release), yields ``None`` there.
        """
        mode = metadata.get("dp_mode")
        secure = metadata.get("secure_aggregation")
        metrics = metadata.get("metrics")
        return cls(
            run_id=_text(metadata.get("run_id")),
            server_round=_integer(metadata.get("server_round")),
            dp_mode=DpMode(mode) if mode in _DP_MODES else None,
            dp_epsilon=_number(metadata.get("dp_epsilon")),
            dp_delta=_number(metadata.get("dp_delta")),
            secure_aggregation=dict(secure) if isinstance(secure, Mapping) else None,
            participants=_integer(metadata.get("participants")),
            metrics={
                str(key): float(value)
                for key, value in (metrics.items() if isinstance(metrics, Mapping) else ())
                if _number(value) is not None
            },
        )

    @property
    def accuracy(self) -> float | None:
        """The central evaluation's accuracy of the version, if recorded."""
        return self.metrics.get("accuracy")

    @property
    def differentially_private(self) -> bool | None:
        """Whether the version was trained with DP; ``None``: unknown.

        An epsilon recorded means DP; so does a DP mode other than ``OFF`` (with
        sample-level DP the server may charge no epsilon of its own).
        """
        if self.dp_epsilon is not None:
            return True
        if self.dp_mode is None:
            return None
        return self.dp_mode is not DpMode.OFF


_DP_MODES = frozenset(mode.value for mode in DpMode)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


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
