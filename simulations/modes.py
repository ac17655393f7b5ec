"""Enums of ``fedge sim run`` that the command line needs before anything heavy is imported."""

from __future__ import annotations

from enum import Enum

__all__ = ["DpMode", "VariantRounds"]


class DpMode(Enum):
    """Which differential privacy a simulated federation runs with."""

    OFF = "off"
    CENTRAL = "central"
    DISTRIBUTED = "distributed"
    LOCAL = "local"
    SAMPLE = "sample"


class VariantRounds(Enum):
    """Which published rounds also get ONNX variants (building them takes a few seconds)."""

    OFF = "off"
    FINAL = "final"
    EVERY = "every"
