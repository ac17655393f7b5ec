"""What the device's model cache hands out and keeps: models, install reports, pointers, errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edge_runtime.manifest import ArtefactEntry, Manifest, check_digest
from fedge.errors import ConfigError, FedgeError

__all__ = [
    "InstallOutcome",
    "InstallReport",
    "InstalledModel",
    "ModelCorrupt",
    "ModelRejected",
    "PointerEntry",
    "check_name",
]

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ENTRY_KEYS = frozenset({"version", "artefact", "digest"})


class ModelRejected(FedgeError):  # noqa: N818 - reads as what happened
    """A model offered for install did not verify or is refused; nothing was installed.

    Not an ``OSError``: a forged or corrupt model is an integrity failure, and
    code that retries or skips on ``OSError`` must never swallow it.
    """


class ModelCorrupt(FedgeError):  # noqa: N818 - reads as what happened
    """An installed model no longer verifies on disk; it is never handed out."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InstalledModel:
    """A verified, installed artefact of one model version."""

    model: str
    version: int
    artefact: str
    path: Path
    digest: str
    size: int
    manifest: Manifest

    @property
    def entry(self) -> ArtefactEntry:
        """The manifest entry of the artefact (its format and precision)."""
        return next(a for a in self.manifest.artefacts if a.name == self.artefact)

    def to_json(self) -> dict[str, Any]:
        """Return what identifies the installed artefact as JSON values."""
        return {
            "model": self.model,
            "version": self.version,
            "artefact": self.artefact,
            "digest": self.digest,
            "size": self.size,
        }


@dataclass(frozen=True, slots=True)
class PointerEntry:
    """One version and artefact a model's pointer names (current or previous)."""

    version: int
    artefact: str
    digest: str

    def to_json(self) -> dict[str, Any]:
        """Return the entry as JSON values."""
        return {"version": self.version, "artefact": self.artefact, "digest": self.digest}

    @classmethod
    def from_json(cls, raw: object) -> PointerEntry:
        """Parse and validate an entry read from a pointer file."""
        if not isinstance(raw, dict) or not set(raw) >= _ENTRY_KEYS:
            raise ConfigError(f"a pointer entry needs the keys {sorted(_ENTRY_KEYS)}")
        version, artefact = raw["version"], raw["artefact"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"a pointer version must be an int >= 1, got {version!r:.40}")
        return cls(version, check_name("artefact name", artefact), check_digest(raw["digest"]))


class InstallOutcome(Enum):
    """What an install did to the cache."""

    INSTALLED = "installed"  # the model's bytes were written into the cache (new or repaired)
    REACTIVATED = "reactivated"  # already in the cache: made current again, a pointer swap
    ALREADY_CURRENT = "already-current"  # it was current already: nothing switched


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallReport:
    """What :meth:`ModelCache.install <edge_runtime.cache.ModelCache.install>` did.

    Attributes
    ----------
    outcome
        Installed, re-activated from the cache, or already current.
    current
        The model now current (verified).
    replaced
        The model that was current before, if this call switched away from one.
    rollback
        What a rollback would switch to now: the version kept for instant rollback
        (blue-green), or ``None`` if no previous version is cached.
    verified_bytes
        The bytes checked against the signed manifest's digests in this call (the
        model and its companions, each counted once).
    written_bytes
        The bytes newly written into the cache (0 for a pointer swap).
    companions
        The companion artefacts verified with the model (``drift-reference.json``).
    """

    outcome: InstallOutcome
    current: InstalledModel
    replaced: PointerEntry | None
    rollback: PointerEntry | None
    verified_bytes: int
    written_bytes: int
    companions: tuple[str, ...]

    def summary(self) -> list[str]:
        """Return two human-readable lines: what happened, and what stays for rollback."""
        current = self.current
        what = f"{current.model} v{current.version} {current.artefact}"
        if self.companions:
            what += f" (+ {', '.join(self.companions)})"
        checked = f"signature and SHA-256 verified ({self.verified_bytes:,} bytes)"
        written = (
            f"{self.written_bytes:,} bytes written" if self.written_bytes else "nothing written"
        )
        was = (
            ""
            if self.replaced is None
            else f" (was v{self.replaced.version} {self.replaced.artefact})"
        )
        if self.outcome is InstallOutcome.ALREADY_CURRENT:
            first = f"{what} is already current: {checked}, {written}"
        elif self.outcome is InstallOutcome.REACTIVATED:
            first = f"re-activated {what} from the cache: {checked}, {written}; now current{was}"
        else:
            first = f"installed {what}: {checked}, {written}; now current{was}"
        if self.rollback is None:
            return [first, "rollback: no previous version is cached"]
        kept = f"v{self.rollback.version} {self.rollback.artefact}"
        return [first, f"rollback: {kept} stays cached"]

    def to_json(self) -> dict[str, Any]:
        """Return the report as JSON values."""
        return {
            "outcome": self.outcome.value,
            "current": self.current.to_json(),
            "replaced": None if self.replaced is None else self.replaced.to_json(),
            "rollback": None if self.rollback is None else self.rollback.to_json(),
            "verified_bytes": self.verified_bytes,
            "written_bytes": self.written_bytes,
            "companions": list(self.companions),
        }


def check_name(what: str, value: object) -> str:
    """Return ``value`` if it is a safe file name (no separators, not ``.`` or ``..``)."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None or value in {".", ".."}:
        raise ConfigError(f"{what} must match [A-Za-z0-9_.-]{{1,64}} and not be '.' or '..'")
    return value
