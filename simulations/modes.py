"""Enums of ``fedge sim run`` that the command line needs before anything heavy is imported."""

from __future__ import annotations

from enum import Enum

from strategies.dp_mode import DpMode

__all__ = ["DpMode", "NormBoundSite", "VariantRounds"]


class VariantRounds(Enum):
    """Which published rounds also get ONNX variants (building them takes a few seconds)."""

    OFF = "off"
    FINAL = "final"
    EVERY = "every"


class NormBoundSite(Enum):
    """Where update norms are bounded (the defence against boosted or poisoned updates)."""

    DEVICE = "device"
    """In each device's fedge runtime, above its training: holds under secure aggregation."""
    SERVER = "server"
    """On the server, on every reply: needs the individual updates (no secure aggregation)."""
