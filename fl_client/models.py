"""The model architectures fedge trains, by name.

Models normalise their own input: they take float images in [0, 1] of shape
(N, 1, 28, 28), so an exported ONNX graph needs no preprocessing contract beyond
"divide the bytes by 255".

Notes
-----
Normalisation layers are GroupNorm, never BatchNorm: BatchNorm mixes examples of
a batch, which breaks per-example gradients (Opacus rejects it) and leaks
statistics across examples.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import nn

from fedge.errors import ConfigError

__all__ = ["FashionCNN", "ModelName", "build_model"]

# Fashion-MNIST pixel mean and standard deviation over the training split.
_PIXEL_MEAN = 0.2860
_PIXEL_STD = 0.3530


class ModelName(Enum):
    """The architectures fedge knows how to build."""

    CNN = "cnn"


class FashionCNN(nn.Module):
    """Two 5x5 conv blocks (16, 32 channels, GroupNorm) and a 64-unit head; 114k parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # Constants, not buffers: the state dict holds trainable weights only, so no
        # aggregation (or DP noise) ever touches the input normalisation.
        self.mean = _PIXEL_MEAN
        self.std = _PIXEL_STD
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, padding=2),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for float images in [0, 1] of shape (N, 1, 28, 28)."""
        normalised = (images - self.mean) / self.std
        logits: torch.Tensor = self.head(self.features(normalised))
        return logits


_REGISTRY: dict[ModelName, Callable[[], nn.Module]] = {
    ModelName.CNN: FashionCNN,
}


def build_model(name: ModelName, *, seed: int | None = None) -> nn.Module:
    """Build a freshly initialised model.

    Parameters
    ----------
    name
        Which architecture.
    seed
        When given, the initial weights are a deterministic function of it.

    Raises
    ------
    ConfigError
        If ``name`` is not a :class:`ModelName`.
    """
    if not isinstance(name, ModelName):
        raise ConfigError(f"unknown model {name!r}; choose one of {[m.value for m in ModelName]}")
    if seed is None:
        return _REGISTRY[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _REGISTRY[name]()
