"""Validation of the flat DP records a round carries (Flower ConfigRecord contents).

Every DP record (``fedge.cdp``, ``fedge.ldp``, ``fedge.ddp``, ``fedge.dpsgd``)
arrives from the network as a flat mapping; :func:`checked_fields` checks it has
exactly the expected fields, each of the expected type, before any config is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

from fedge.errors import ConfigError

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "FieldValue",
    "check_noise_multiplier",
    "checked_fields",
]

# Noise multipliers outside these bounds protect nothing (below) or are typos (above),
# and at the extremes the accountants overflow or divide by zero (1e-200 squared is 0).
MIN_NOISE_MULTIPLIER = 1e-6
MAX_NOISE_MULTIPLIER = 1e6

FieldValue = float | int | bool | bytes


def _fits(value: object, kind: type) -> bool:
    if kind is float:  # an integer is a number too; a boolean is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def check_noise_multiplier(value: float, name: str = "noise_multiplier") -> None:
    """Refuse a noise multiplier outside [1e-6, 1e6] (or not a finite number).

    Raises
    ------
    ConfigError
        Naming the parameter and the bounds.
    """
    if not (math.isfinite(value) and MIN_NOISE_MULTIPLIER <= value <= MAX_NOISE_MULTIPLIER):
        raise ConfigError(
            f"{name} must be in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}], got {value}"
        )


def checked_fields(
    fields: Mapping[str, object], kinds: Mapping[str, type], *, what: str
) -> dict[str, FieldValue]:
    """Return ``fields`` with numbers as ``float`` where ``kinds`` says float.

    Raises
    ------
    ConfigError
        If a field is missing or extra, or of the wrong type.
    """
    if set(fields) != set(kinds):
        raise ConfigError(f"a {what} record has fields {sorted(kinds)}")
    out: dict[str, FieldValue] = {}
    for name, kind in kinds.items():
        value = fields[name]
        if not _fits(value, kind):
            expected = "a number" if kind is float else kind.__name__
            raise ConfigError(f"{what} field {name!r} must be {expected}")
        checked = cast(FieldValue, value)
        out[name] = float(checked) if kind is float else checked
    return out
