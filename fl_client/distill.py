"""Knowledge distillation: fine-tune a (pruned) student against its teacher's soft labels.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015: with
teacher logits ``z_t`` and student logits ``z_s``, the loss is
``alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)``;
``T^2`` keeps the soft term's gradients on the scale of the hard term's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedge.errors import ConfigError
from fl_client.training import TrainConfig, images_to_tensor

__all__ = ["DistillConfig", "DistillReport", "Optimiser", "distill"]

_CPU = torch.device("cpu")
_TEACHER_BATCH = 1000


class Optimiser(Enum):
    """The optimiser :func:`distill` fine-tunes the student with."""

    SGD = "sgd"
    ADAM = "adam"


@dataclass(frozen=True, slots=True, kw_only=True)
class DistillConfig:
    """Hyper-parameters of knowledge distillation.

    Parameters
    ----------
    epochs
        Passes over the transfer set, >= 1.
    batch_size
        Examples per step, >= 1.
    learning_rate
        Step size, finite and > 0.
    momentum
        SGD momentum in [0, 1); ignored by Adam.
    optimiser
        SGD (with momentum) or Adam.
    temperature
        Softening temperature ``T`` of both softmaxes, finite and > 0.
    alpha
        Weight of the distillation term in [0, 1]; ``1 - alpha`` weighs the
        cross-entropy on the labels (1: teacher only, 0: labels only).
    """

    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.9
    optimiser: Optimiser = Optimiser.SGD
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        # Epochs, batch size, learning rate and momentum follow local training's rules.
        TrainConfig(
            local_epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
        )
        if not isinstance(self.optimiser, Optimiser):
            raise ConfigError(
                f"optimiser must be one of {[o.value for o in Optimiser]}, got {self.optimiser!r}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True, slots=True)
class DistillReport:
    """The fine-tuned student, its mean loss in each epoch and the transfer-set size."""

    student: nn.Module
    epoch_losses: tuple[float, ...]
    num_examples: int


def _optimiser(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    if config.optimiser is Optimiser.ADAM:
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    teacher.eval()
    return torch.cat(
        [
            teacher(inputs[start : start + _TEACHER_BATCH])
            for start in range(0, len(inputs), _TEACHER_BATCH)
        ]
    )


def distill(
    teacher: nn.Module,
    student: nn.Module,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer],
    *,
    config: DistillConfig,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> DistillReport:
    """Train ``student`` in place to match ``teacher``'s softened outputs and the labels.

    Parameters
    ----------
    teacher
        The model to imitate; put in eval mode, its weights are not changed.
    student
        The model to train, e.g. :func:`prune_structured`'s output; modified in place.
    images, labels
        The transfer set: uint8 images (N, 28, 28) and their labels.
    config
        Temperature, loss weight, epochs and optimiser settings.
    generator
        Source of the shuffling order (seeded for reproducible runs).
    device
        Where to compute, as in :func:`fl_client.training.train`; both models come
        back on the CPU. ``None``: the CPU.

    Returns
    -------
    DistillReport
        The student, the mean loss of each epoch and the number of examples.

    Raises
    ------
    ConfigError
        If the transfer set is empty, images and labels differ in length, or teacher
        and student give different numbers of logits.
    """
    if len(images) == 0:
        raise ConfigError("cannot distil on an empty transfer set")
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    device = device or _CPU
    inputs = images_to_tensor(images).to(device)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    teacher.to(device)
    student.to(device)
    try:
        # The teacher is fixed: its logits are computed once, not once an epoch.
        soft_targets = _teacher_logits(teacher, inputs)
        with torch.no_grad():
            student_classes = student(inputs[:1]).shape[1]
        if student_classes != soft_targets.shape[1]:
            raise ConfigError(
                f"the teacher gives {soft_targets.shape[1]} logits but the student "
                f"{student_classes}"
            )
        temperature = config.temperature
        teacher_probabilities = torch.softmax(soft_targets / temperature, dim=1)
        optimiser = _optimiser(student, config)
        student.train()
        epoch_losses: list[float] = []
        for _ in range(config.epochs):
            order = torch.randperm(len(inputs), generator=generator).to(device)
            losses: list[torch.Tensor] = []
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                logits = student(inputs[batch])
                soft = nn.functional.kl_div(
                    torch.log_softmax(logits / temperature, dim=1),
                    teacher_probabilities[batch],
                    reduction="batchmean",
                )
                hard = nn.functional.cross_entropy(logits, targets[batch])
                loss = config.alpha * temperature**2 * soft + (1 - config.alpha) * hard
                optimiser.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimiser.step()
                losses.append(loss.detach())
            epoch_losses.append(float(torch.stack(losses).double().mean()))
    finally:
        teacher.to(_CPU)
        student.to(_CPU)
    return DistillReport(
        student=student, epoch_losses=tuple(epoch_losses), num_examples=len(inputs)
    )
