"""Enums of ``fedge sim run`` that the command line needs before anything heavy is imported."""

from __future__ import annotations

from enum import Enum

__all__ = ["DpMode"]


class DpMode(Enum):
    """Which differential privacy a simulated federation runs with."""

    OFF = "off"
    CENTRAL = "central"
    DISTRIBUTED = "distributed"
    LOCAL = "local"
    SAMPLE = "sample"
