"""Measure an attack while a scenario runs: the backdoor's success rate after every round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from edge_runtime.model_spec import ModelSpec
from fl_server import RoundReport
from fl_server.checkpoints import load_weights
from simulations.attacks import AttackConfig, AttackKind, backdoor_success_rate

__all__ = ["BackdoorObserver"]

_EXAMPLES = 2000
"""Test examples the per-round success rate is measured on (the first N)."""


class BackdoorObserver:
    """A round observer recording the backdoor success rate of every round's global model.

    Parameters
    ----------
    attack
        A ``BACKDOOR`` attack.
    model
        The scenario's model.
    images, labels
        The held-out test examples (uint8 images); the first 2,000 are used.
    """

    def __init__(
        self,
        attack: AttackConfig,
        model: ModelSpec,
        images: npt.NDArray[np.uint8],
        labels: npt.NDArray[np.integer[Any]],
    ) -> None:
        if attack.kind is not AttackKind.BACKDOOR:
            raise ValueError("BackdoorObserver measures a BACKDOOR attack")
        self._attack = attack
        self._network = model.build()
        self._images = images[:_EXAMPLES]
        self._labels = labels[:_EXAMPLES]
        self.rates: dict[int, float] = {}

    def on_round(self, report: RoundReport) -> None:
        """Load the round's saved global model and measure the backdoor on it."""
        weights = load_weights(Path(report.model_path), expected_sha256=report.model_sha256)
        state = {name: torch.from_numpy(np.asarray(value)) for name, value in weights.items()}
        self._network.load_state_dict(state, strict=True)
        self.rates[report.server_round] = round(
            backdoor_success_rate(self._network, self._images, self._labels, self._attack), 4
        )
