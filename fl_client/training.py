"""Local training and evaluation of a model on one client's examples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedge.errors import ConfigError

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "images_to_tensor",
    "train",
]


_CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of one client's local training in one round.

    Parameters
    ----------
    local_epochs
        Passes over the local data per round, >= 1.
    batch_size
        Examples per SGD step, >= 1.
    learning_rate
        SGD step size, > 0.
    momentum
        SGD momentum in [0, 1).
    """

    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ConfigError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate}"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training reports: examples seen per epoch and the mean loss."""

    num_examples: int
    mean_loss: float


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


def train(
    model: nn.Module,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer],
    config: TrainConfig,
    *,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place with SGD on the given examples.

    Parameters
    ----------
    model
        The model, modified in place.
    images, labels
        The local examples.
    config
        Epochs, batch size and optimiser settings.
    generator
        Source of the shuffling order (seeded for reproducible simulations).
    device
        Where to train (see :func:`fl_client.device.select_device`); the model
        is moved there for training and returned to the CPU afterwards. ``None``:
        the CPU.

    Returns
    -------
    TrainResult
        The number of local examples and the mean training loss over all steps.

    Raises
    ------
    ConfigError
        If there are no examples or images and labels disagree in length.
    """
    if len(images) == 0:
        raise ConfigError("cannot train on an empty partition")
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    device = device or _CPU
    inputs = images_to_tensor(images).to(device)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    model.to(device)
    try:
        optimiser = torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=config.momentum
        )
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        losses: list[torch.Tensor] = []  # kept on the device: no host sync per step
        for _ in range(config.local_epochs):
            # The order comes from the (CPU) generator, so a seed gives the same
            # order on every device.
            order = torch.randperm(len(inputs), generator=generator).to(device)
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs[batch]), targets[batch])
                loss.backward()
                optimiser.step()
                losses.append(loss.detach())
    finally:
        model.to(_CPU)
    mean_loss = float(torch.stack(losses).cpu().double().mean())
    return TrainResult(num_examples=len(inputs), mean_loss=mean_loss)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer],
    *,
    batch_size: int = 1000,
    device: torch.device | None = None,
) -> EvalResult:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on the examples.

    ``device`` as in :func:`train`: the model comes back on the CPU.
    """
    if len(images) == 0:
        raise ConfigError("cannot evaluate on an empty set")
    device = device or _CPU
    inputs = images_to_tensor(images)
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
