"""Enums of ``fedge sim run`` that the command line needs before anything heavy is imported."""

from __future__ import annotations

from enum import Enum

from strategies.dp_mode import DpMode

__all__ = ["DpMode", "VariantRounds"]


class VariantRounds(Enum):
    """Which published rounds also get ONNX variants (building them takes a few seconds)."""

    OFF = "off"
    FINAL = "final"
    EVERY = "every"
