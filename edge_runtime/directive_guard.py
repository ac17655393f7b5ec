"""The device's side of a rollout: decide what a signed release directive asks of this device.

:class:`DirectiveGuard` keeps, per model, the sequence number of the last
directive the device acted on (a small JSON file in the model cache, replaced
atomically) and turns a new directive into a :class:`Decision`: install a
version, roll back to a version, or stay. Nothing the server says is taken on
trust (see :mod:`edge_runtime.release` for the rules); a refused directive
raises :class:`DirectiveRefused` and changes nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edge_runtime.durable import write_atomically
from edge_runtime.manifest import ManifestInvalid
from edge_runtime.release import DirectiveKind, SignedDirective, verify_directive
from fedge.errors import ConfigError, FedgeError, StorageError

__all__ = ["Action", "Decision", "DirectiveGuard", "DirectiveRefused"]

logger = logging.getLogger(__name__)

_STATE = "directives.json"


class DirectiveRefused(FedgeError, ValueError):  # noqa: N818 - reads as what happened
    """A directive is forged, replayed, for another model or asks what a rollout may not."""


class Action(Enum):
    """What the device does about a directive."""

    INSTALL = "install"  # move forward to the directive's version
    ROLLBACK = "rollback"  # go back to the (older) version a signed rollback names
    STAY = "stay"  # keep what runs (not in the cohort, opted out, or already there)


@dataclass(frozen=True, slots=True)
class Decision:
    """An action, the version it targets, the directive's sequence and why."""

    action: Action
    version: int | None
    sequence: int
    reason: str
    artefact: str | None = None  # the variant chosen for this device's class, if any


class DirectiveGuard:
    """Check directives for one device against its own pinned key, id and history.

    Parameters
    ----------
    state_dir
        Where ``directives.json`` lives (the device's model cache directory);
        ``None`` keeps the history in memory only (simulated devices).
    device_id
        The device's enrolment id (what its cohort bucket is computed from).
    store_public_key
        The store key the device pinned (raw 32 bytes).
    opted_out
        The device's owner declined canaries: it follows only fleet-wide stages
        (and rollbacks).
    device_class
        The device's class as its own profile measured it
        (:attr:`~edge_runtime.device_profile.DeviceProfile.device_class`): picks its
        variant from the directive's per-class choice.
    """

    def __init__(
        self,
        state_dir: Path | None,
        *,
        device_id: str,
        store_public_key: bytes,
        opted_out: bool = False,
        device_class: str | None = None,
    ) -> None:
        self._path = None if state_dir is None else state_dir / _STATE
        self._device_class = device_class
        self._memory: dict[str, int] = {}
        self._device_id = device_id
        self._key = store_public_key
        self._opted_out = opted_out

    @property
    def opted_out(self) -> bool:
        """Whether the device's owner declined canary stages."""
        return self._opted_out

    def last_sequence(self, model: str) -> int:
        """Return the sequence of the last directive of ``model`` this device acted on (0: none)."""
        return self._read().get(model, 0)

    def decide(self, signed: SignedDirective, *, model: str, current: int | None) -> Decision:
        """Return what to do about ``signed`` for ``model``, whose version ``current`` runs.

        Raises
        ------
        DirectiveRefused
            If the signature does not verify, the directive is for another model or
            not newer than the last one acted on, or a rollout would move the device
            to an older version.
        """
        try:
            directive = verify_directive(signed, self._key)
        except ManifestInvalid as exc:
            raise DirectiveRefused(f"release directive refused: {exc}") from exc
        if directive.model != model:
            raise DirectiveRefused(f"the directive is for {directive.model}, not {model}")
        last = self.last_sequence(model)
        if directive.sequence <= last:
            raise DirectiveRefused(
                f"directive {directive.sequence} of {model} is not newer than {last}, the last "
                "one acted on (replayed or out of date)"
            )
        sequence = directive.sequence
        if directive.kind is DirectiveKind.ROLLBACK:
            if current == directive.version:
                return Decision(Action.STAY, current, sequence, "already on the rollback target")
            return Decision(
                Action.ROLLBACK,
                directive.version,
                sequence,
                f"signed rollback of {model}",
                directive.artefact_for(self._device_class),
            )
        if not directive.targets(self._device_id):
            return Decision(
                Action.STAY,
                current,
                sequence,
                f"not in the {100 * directive.cohort_fraction:g} % cohort",
            )
        if self._opted_out and directive.cohort_fraction < 1:
            return Decision(Action.STAY, current, sequence, "opted out of canary stages")
        if current is not None and directive.version < current:
            raise DirectiveRefused(
                f"a rollout never moves a device back: v{directive.version} < current v{current}"
            )
        if current == directive.version:
            return Decision(Action.STAY, current, sequence, "already on this version")
        return Decision(
            Action.INSTALL,
            directive.version,
            sequence,
            "in the cohort",
            directive.artefact_for(self._device_class),
        )

    def acted(self, model: str, decision: Decision) -> None:
        """Record that ``decision`` was carried out: directives up to its sequence are refused."""
        state = self._read()
        if decision.sequence <= state.get(model, 0):
            return
        state[model] = decision.sequence
        if self._path is None:
            self._memory = state
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._path, json.dumps(state, sort_keys=True).encode())
        except OSError as exc:
            raise StorageError(f"cannot record the directive in {self._path}: {exc}") from exc

    def _read(self) -> dict[str, int]:
        if self._path is None:
            return dict(self._memory)
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self._path}: {exc}") from exc
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in raw.items()
        ):
            raise ConfigError(f"{self._path} is not a map of model names to sequence numbers")
        return raw
