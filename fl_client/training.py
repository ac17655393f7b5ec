"""Local training and evaluation of a model on one client's examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from edge_runtime.models import EvalResult, InputEncoding, evaluate, images_to_tensor, to_tensor
from fedge.errors import ConfigError
from strategies.train_config import TrainConfig

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "images_to_tensor",
    "train",
]


_CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training reports: examples seen per epoch and the mean loss."""

    num_examples: int
    mean_loss: float


def train(
    model: nn.Module,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.integer],
    config: TrainConfig,
    *,
    generator: torch.Generator,
    device: torch.device | None = None,
    encoding: InputEncoding = InputEncoding.UINT8_IMAGES,
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
    encoding
        How ``images`` become the model's input (uint8 images, or float features).

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
    inputs = to_tensor(images, encoding).to(device)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    model.to(device)
    try:
        optimiser = torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=config.momentum
        )
        loss_fn = nn.CrossEntropyLoss()
        # FedProx: the gradient of mu/2 ||w - w_global||^2 is mu (w - w_global).
        anchors = [p.detach().clone() for p in model.parameters()] if config.proximal_mu else []
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
                for param, anchor in zip(model.parameters(), anchors, strict=False):
                    if param.grad is not None:
                        param.grad.add_(param.detach() - anchor, alpha=config.proximal_mu)
                optimiser.step()
                losses.append(loss.detach())
    finally:
        model.to(_CPU)
    mean_loss = float(torch.stack(losses).cpu().double().mean())
    return TrainResult(num_examples=len(inputs), mean_loss=mean_loss)
