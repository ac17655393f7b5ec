"""A small multilayer perceptron for tabular sensor features (UCI Shuttle and the like).

Named in a scenario file by import path, ``simulations.tabular:SensorMLP``, with
keyword arguments; its inputs are float32 ``(N, in_features)`` features
(``InputEncoding.FLOAT32``), standardised by the data set's loader.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedge.errors import ConfigError

__all__ = ["SensorMLP"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


class SensorMLP(nn.Module):
    """Map float features to class logits through fully connected ReLU layers.

    Parameters
    ----------
    in_features
        Number of input features (9 for Shuttle); an input ``(N, ...)`` is
        flattened to ``(N, in_features)``.
    num_classes
        Number of output logits, at least 2 (7 for Shuttle).
    hidden_units
        Width of each hidden layer, in order; ``()`` gives a linear model.

    Raises
    ------
    ConfigError
        If a size is not a positive int, ``num_classes`` is below 2, or
        ``hidden_units`` is not a sequence of positive ints.

    Notes
    -----
    No BatchNorm: its statistics mix the examples of a batch, which per-example
    gradients (Opacus DP-SGD) cannot allow, and Opacus rejects the module. The
    features arrive standardised, so no normalisation layer is needed.
    """

    def __init__(
        self,
        in_features: int = 9,
        num_classes: int = 7,
        *,
        hidden_units: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__()
        in_features = _positive_int("in_features", in_features)
        num_classes = _positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if isinstance(hidden_units, str | bytes) or not isinstance(hidden_units, Sequence):
            raise ConfigError(f"hidden_units must be a sequence of ints, got {hidden_units!r}")
        widths = tuple(_positive_int("every hidden_units entry", w) for w in hidden_units)
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden_units = widths
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for width in widths:
            layers += [nn.Linear(previous, width), nn.ReLU()]
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(N, num_classes)`` of float features ``(N, in_features)``."""
        logits: torch.Tensor = self.layers(features)
        return logits
