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
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedge.errors import ConfigError

__all__ = [
    "FashionCNN",
    "FashionMLP",
    "InputEncoding",
    "ModelName",
    "build_model",
    "to_tensor",
]

# Fashion-MNIST pixel mean and standard deviation over the training split.
_PIXEL_MEAN = 0.2860
_PIXEL_STD = 0.3530
_IMAGE_SIDE = 28


class ModelName(Enum):
    """The architectures fedge knows how to build."""

    CNN = "cnn"
    MLP = "mlp"


class FashionCNN(nn.Module):
    """Two 5x5 conv blocks (16, 32 channels, GroupNorm) and a 64-unit head; 114k parameters.

    Parameters
    ----------
    num_classes
        Number of output logits.
    channels
        Output channels of the two conv blocks; each must be a positive multiple of
        its block's GroupNorm group count (4 and 8). Narrower widths are what
        structured pruning (:mod:`fl_client.compress`) produces; the state-dict keys
        do not depend on the widths.
    hidden_units
        Width of the head's hidden layer, >= 1.

    Raises
    ------
    ConfigError
        If a width is not positive or a channel count is not a multiple of its group count.
    """

    #: GroupNorm group counts of the two conv blocks; fixed, so pruning keeps them.
    GROUPS: ClassVar[tuple[int, int]] = (4, 8)

    def __init__(
        self,
        num_classes: int = 10,
        *,
        channels: tuple[int, int] = (16, 32),
        hidden_units: int = 64,
    ) -> None:
        super().__init__()
        for width, groups in zip(channels, self.GROUPS, strict=True):
            if width < 1 or width % groups:
                raise ConfigError(
                    f"channels must be positive multiples of {list(self.GROUPS)}, "
                    f"got {list(channels)}"
                )
        if hidden_units < 1:
            raise ConfigError(f"hidden_units must be >= 1, got {hidden_units}")
        first, second = channels
        # Constants, not buffers: the state dict holds trainable weights only, so no
        # aggregation (or DP noise) ever touches the input normalisation.
        self.mean = _PIXEL_MEAN
        self.std = _PIXEL_STD
        self.features = nn.Sequential(
            nn.Conv2d(1, first, kernel_size=5, padding=2),
            nn.GroupNorm(self.GROUPS[0], first),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=5, padding=2),
            nn.GroupNorm(self.GROUPS[1], second),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * 7 * 7, hidden_units),
            nn.ReLU(),
            nn.Linear(hidden_units, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for float images in [0, 1] of shape (N, 1, 28, 28)."""
        normalised = (images - self.mean) / self.std
        logits: torch.Tensor = self.head(self.features(normalised))
        return logits


class FashionMLP(nn.Module):
    """A ReLU multi-layer perceptron on the flattened image; 3.97M parameters by default.

    784-2048-1024-256-10, no normalisation layers (DP-SGD refuses BatchNorm). The
    large, linear-heavy counterpart of :class:`FashionCNN`: where MatMul dominates,
    which is what INT8 dynamic and INT4 weight-only quantisation act on.

    Parameters
    ----------
    num_classes
        Number of output logits.
    hidden_units
        Widths of the hidden layers, at least one, each >= 1. The state-dict keys are
        ``layers.{1,3,5,...}.{weight,bias}`` whatever the widths.

    Raises
    ------
    ConfigError
        If ``hidden_units`` is empty or holds a width < 1.
    """

    def __init__(
        self, num_classes: int = 10, *, hidden_units: tuple[int, ...] = (2048, 1024, 256)
    ) -> None:
        super().__init__()
        if not hidden_units or min(hidden_units) < 1:
            raise ConfigError(
                f"hidden_units must be one or more widths >= 1, got {list(hidden_units)}"
            )
        self.mean = _PIXEL_MEAN
        self.std = _PIXEL_STD
        layers: list[nn.Module] = [nn.Flatten()]
        inputs = _IMAGE_SIDE * _IMAGE_SIDE
        for width in hidden_units:
            layers += [nn.Linear(inputs, width), nn.ReLU()]
            inputs = width
        layers.append(nn.Linear(inputs, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for float images in [0, 1] of shape (N, 1, 28, 28)."""
        logits: torch.Tensor = self.layers((images - self.mean) / self.std)
        return logits


_REGISTRY: dict[ModelName, Callable[[], nn.Module]] = {
    ModelName.CNN: FashionCNN,
    ModelName.MLP: FashionMLP,
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


_CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Loss and accuracy of a model on a labelled set."""

    num_examples: int
    loss: float
    accuracy: float


def images_to_tensor(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    """Turn uint8 images (N, 28, 28) into float32 (N, 1, 28, 28) in [0, 1]."""
    if images.ndim != 3:
        raise ConfigError(f"images must have shape (N, H, W), got {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / 255.0).unsqueeze(1)


class InputEncoding(Enum):
    """How a data set's examples become a model's input tensor."""

    UINT8_IMAGES = "uint8-images"
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    FLOAT32 = "float32"
    """Any numeric (N, ...) -> float32 (N, ...), values unchanged."""


def to_tensor(inputs: npt.NDArray[Any], encoding: InputEncoding) -> torch.Tensor:
    """Return ``inputs`` as the float32 tensor a model of ``encoding`` takes.

    Raises
    ------
    ConfigError
        If the array does not fit the encoding (uint8 images must be (N, H, W)).
    """
    if encoding is InputEncoding.UINT8_IMAGES:
        if inputs.dtype != np.uint8:
            raise ConfigError(f"uint8-images inputs must be uint8, got {inputs.dtype}")
        return images_to_tensor(inputs)
    if encoding is InputEncoding.FLOAT32:
        if inputs.ndim < 2:
            raise ConfigError(f"float32 inputs must have shape (N, ...), got {inputs.shape}")
        values = np.ascontiguousarray(inputs, dtype=np.float32)
        # A shared, read-only array (a cached data set) is copied: torch needs a writable one.
        return torch.from_numpy(values if values.flags.writeable else values.copy())
    raise ConfigError(f"unknown input encoding {encoding!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.integer],
    *,
    batch_size: int = 1000,
    device: torch.device | None = None,
    encoding: InputEncoding = InputEncoding.UINT8_IMAGES,
) -> EvalResult:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on the examples.

    ``device`` as in :func:`train`: the model comes back on the CPU.
    """
    if len(images) == 0:
        raise ConfigError("cannot evaluate on an empty set")
    device = device or _CPU
    inputs = to_tensor(images, encoding)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model.to(device)
    try:
        model.eval()
        loss_sum = 0.0
        correct = 0
        for start in range(0, len(inputs), batch_size):
            logits = model(inputs[start : start + batch_size].to(device))
            batch_targets = targets[start : start + batch_size].to(device)
            loss_sum += float(nn.functional.cross_entropy(logits, batch_targets, reduction="sum"))
            correct += int((logits.argmax(dim=1) == batch_targets).sum())
    finally:
        model.to(_CPU)
    return EvalResult(
        num_examples=len(inputs), loss=loss_sum / len(inputs), accuracy=correct / len(inputs)
    )
