"""Which differential privacy a federation runs with: one enum for every side and command."""

from __future__ import annotations

from enum import Enum

__all__ = ["DpMode"]


class DpMode(Enum):
    """The DP mode of a run (``fedge sim run --dp``, a deployment's ``[privacy] mode``).

    ``CENTRAL``: devices clip, the server adds Gaussian noise; ``DISTRIBUTED``:
    devices add discrete Gaussian noise under secure aggregation; ``LOCAL``:
    devices clip and noise their own updates; ``SAMPLE``: DP-SGD on every device;
    ``SAMPLE_DISTRIBUTED``: one DP-SGD step a round over every device's examples,
    each device adding only its share of the noise under secure aggregation
    (:mod:`strategies.sample_ddp`).
    """

    OFF = "off"
    CENTRAL = "central"
    DISTRIBUTED = "distributed"
    LOCAL = "local"
    SAMPLE = "sample"
    SAMPLE_DISTRIBUTED = "sample-distributed"

    @property
    def needs_secure_aggregation(self) -> bool:
        """Whether the mode's noise is split among devices (only a secure sum protects it)."""
        return self in (DpMode.DISTRIBUTED, DpMode.SAMPLE_DISTRIBUTED)
