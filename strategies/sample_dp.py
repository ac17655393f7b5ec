"""What the server asks of sample-level DP-SGD on the devices: the ``fedge.dpsgd`` record.

Each device trains with Opacus (``fl_client.dp_sgd``): per-example gradients
clipped to ``max_grad_norm``, Gaussian noise, Poisson batches, and its own
accountant. With ``target_epsilon`` the device picks the noise multiplier that
reaches that epsilon after ``total_epochs`` local epochs (the run's rounds
times its local epochs), so a device that takes part in every round ends at
the target; with ``noise_multiplier`` the noise is fixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

from fedge.errors import ConfigError
from strategies.records import check_noise_multiplier, checked_fields

__all__ = ["DPSGD_RECORD_KEY", "SampleDpSettings"]

DPSGD_RECORD_KEY: Final = "fedge.dpsgd"
_FIELDS: dict[str, type] = {
    "max-grad-norm": float,
    "noise-multiplier": float,
    "target-epsilon": float,
    "delta": float,
    "total-epochs": int,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleDpSettings:
    """Sample-level DP-SGD settings sent to every device.

    Parameters
    ----------
    max_grad_norm
        The per-example gradient clip, > 0.
    noise_multiplier
        Fixed noise (0 when ``target_epsilon`` is used).
    target_epsilon
        The epsilon each device reaches after ``total_epochs`` (0 when the noise is fixed).
    delta
        The delta of the target, in (0, 1).
    total_epochs
        Local epochs over the whole run (rounds x local epochs), >= 1.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    total_epochs: int = 1

    def __post_init__(self) -> None:
        for name in ("max_grad_norm", "noise_multiplier", "target_epsilon", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.max_grad_norm <= 0:
            raise ConfigError("max_grad_norm must be > 0")
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ConfigError("give exactly one of noise_multiplier and target_epsilon (> 0)")
        if self.noise_multiplier > 0:
            check_noise_multiplier(self.noise_multiplier)
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.total_epochs < 1:
            raise ConfigError(f"total_epochs must be >= 1, got {self.total_epochs}")

    def to_fields(self) -> dict[str, float | int]:
        """Return the flat fields of a Flower ConfigRecord."""
        return {
            "max-grad-norm": self.max_grad_norm,
            "noise-multiplier": self.noise_multiplier,
            "target-epsilon": self.target_epsilon,
            "delta": self.delta,
            "total-epochs": self.total_epochs,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> SampleDpSettings:
        """Validate fields from the network.

        Raises
        ------
        ConfigError
            If a field is missing, of the wrong type or out of range.
        """
        values = checked_fields(fields, _FIELDS, what="DP-SGD")
        return cls(
            max_grad_norm=cast(float, values["max-grad-norm"]),
            noise_multiplier=cast(float, values["noise-multiplier"]),
            target_epsilon=cast(float, values["target-epsilon"]),
            delta=cast(float, values["delta"]),
            total_epochs=cast(int, values["total-epochs"]),
        )
