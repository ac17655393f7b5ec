"""What the device's model cache hands out and keeps: installed models, pointer entries, errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.manifest import ArtefactEntry, Manifest, check_digest
from fedge.errors import ConfigError, FedgeError

__all__ = ["InstalledModel", "ModelCorrupt", "ModelRejected", "PointerEntry", "check_name"]

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


def check_name(what: str, value: object) -> str:
    """Return ``value`` if it is a safe file name (no separators, not ``.`` or ``..``)."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None or value in {".", ".."}:
        raise ConfigError(f"{what} must match [A-Za-z0-9_.-]{{1,64}} and not be '.' or '..'")
    return value
