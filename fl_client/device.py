"""Pick the accelerator local training runs on: CUDA, Apple's MPS, or the CPU.

One code path for every device: :func:`select_device` resolves a
:class:`DeviceKind` to a ``torch.device`` and says why, and
:func:`fl_client.training.train` / :func:`~fl_client.training.evaluate` move the
model and each batch there, then hand the model back on the CPU (weights leave
the device as numpy arrays).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

import torch

from fedge.errors import ConfigError

__all__ = ["DeviceChoice", "DeviceKind", "select_device"]

logger = logging.getLogger(__name__)


class DeviceKind(Enum):
    """Where local training should run; ``AUTO`` takes the best one present."""

    AUTO = "auto"
    CUDA = "cuda"
    MPS = "mps"
    CPU = "cpu"


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """The device training will use, what was asked for, and why this one."""

    device: torch.device
    requested: DeviceKind
    reason: str

    @property
    def kind(self) -> DeviceKind:
        """The kind of the chosen device."""
        return DeviceKind(self.device.type)


def _cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(preference: DeviceKind = DeviceKind.AUTO) -> DeviceChoice:
    """Return the device local training runs on.

    Parameters
    ----------
    preference
        ``AUTO`` picks CUDA, then MPS, then the CPU, whichever is present; a
        named kind is used only if present.

    Raises
    ------
    ConfigError
        If ``preference`` is not a :class:`DeviceKind`, or names an accelerator
        this machine's torch cannot use (no silent fallback when one is asked for).
    """
    if not isinstance(preference, DeviceKind):
        raise ConfigError(
            f"device must be one of {[k.value for k in DeviceKind]}, got {preference!r}"
        )
    present = {DeviceKind.CUDA: _cuda_available(), DeviceKind.MPS: _mps_available()}
    if preference is DeviceKind.AUTO:
        for kind in (DeviceKind.CUDA, DeviceKind.MPS):
            if present[kind]:
                name = torch.cuda.get_device_name(0) if kind is DeviceKind.CUDA else "mps"
                return DeviceChoice(torch.device(kind.value), preference, f"auto: {name}")
        return DeviceChoice(torch.device("cpu"), preference, "auto: no CUDA or MPS device")
    if preference is DeviceKind.CPU:
        return DeviceChoice(torch.device("cpu"), preference, "asked for the CPU")
    if not present[preference]:
        raise ConfigError(
            f"device {preference.value!r} was asked for but torch {torch.__version__} "
            f"cannot use one here; use 'auto' or 'cpu'"
        )
    return DeviceChoice(torch.device(preference.value), preference, f"asked for {preference.value}")
