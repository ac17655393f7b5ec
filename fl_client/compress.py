"""Compress a trained model beyond quantisation: structured pruning, then distillation.

:func:`prune_structured` returns a *physically smaller* copy of a model: whole conv
channels and hidden neurons are removed and the next layer's input weights sliced to
match, so parameters, FLOPs and the exported ONNX file all shrink (masks would leave
them as they were). :func:`distill` fine-tunes the pruned student against the
original teacher (:mod:`fl_client.distill`); :func:`compress` chains the two.

Notes
-----
**Saliency**: a channel or neuron is ranked by the L1 norm of its incoming weights
(a conv filter, a linear row), each layer on the original weights, independently
(Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017). fedge's models have
no BatchNorm scale to rank by (DP-SGD refuses BatchNorm).

**GroupNorm**: :class:`~edge_runtime.models.FashionCNN` normalises groups of
consecutive channels together. Pruning keeps the group count and the same number of
channels in every group, the highest-norm ones *of that group*: a survivor is never
normalised with another group's channels, and filter norms are only compared where
they share a normalisation. The group statistics still change, one more reason to
fine-tune.

**Distillation** (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural
Network", 2015), teacher logits ``z_t``, student logits ``z_s``:
``alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)``;
``T^2`` keeps the soft term's gradients on the scale of the hard term's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from edge_runtime.models import FashionCNN, FashionMLP
from fedge.errors import ConfigError
from fl_client.distill import DistillConfig, distill

__all__ = ["compress", "prunable_layers", "prune_structured"]


def _kept_count(width: int, fraction: float) -> int:
    # Round half up, at least one: keep_fraction=1.0 keeps every unit exactly.
    return max(1, math.floor(fraction * width + 0.5))


def _top_l1(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Return the indices (ascending) of the ``count`` output units of largest L1 norm."""
    scores = weight.detach().abs().flatten(1).sum(dim=1)
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:count]).values


def _top_l1_grouped(weight: torch.Tensor, groups: int, fraction: float) -> torch.Tensor:
    """Return as many highest-L1 channels from each of ``groups`` consecutive groups."""
    per_group = weight.shape[0] // groups
    count = _kept_count(per_group, fraction)
    kept = [
        _top_l1(weight[group * per_group : (group + 1) * per_group], count) + group * per_group
        for group in range(groups)
    ]
    return torch.cat(kept)


def _cnn_layers(model: nn.Module) -> tuple[str, ...]:
    return ("features.0", "features.4", "head.1")


def _prune_cnn(model: nn.Module, fractions: Mapping[str, float]) -> nn.Module:
    state = model.state_dict()
    first_groups, second_groups = FashionCNN.GROUPS
    first = _top_l1_grouped(state["features.0.weight"], first_groups, fractions["features.0"])
    second = _top_l1_grouped(state["features.4.weight"], second_groups, fractions["features.4"])
    hidden_weight = state["head.1.weight"]
    hidden = _top_l1(hidden_weight, _kept_count(hidden_weight.shape[0], fractions["head.1"]))
    # Flatten lays the conv output out channel by channel: each channel owns a
    # contiguous run of `positions` columns of the first head layer.
    positions = hidden_weight.shape[1] // state["features.4.weight"].shape[0]
    columns = (second[:, None] * positions + torch.arange(positions, device=second.device)).reshape(
        -1
    )
    sliced = {
        "features.0.weight": state["features.0.weight"][first],
        "features.0.bias": state["features.0.bias"][first],
        "features.1.weight": state["features.1.weight"][first],
        "features.1.bias": state["features.1.bias"][first],
        "features.4.weight": state["features.4.weight"][second][:, first],
        "features.4.bias": state["features.4.bias"][second],
        "features.5.weight": state["features.5.weight"][second],
        "features.5.bias": state["features.5.bias"][second],
        "head.1.weight": hidden_weight[hidden][:, columns],
        "head.1.bias": state["head.1.bias"][hidden],
        "head.3.weight": state["head.3.weight"][:, hidden],
        "head.3.bias": state["head.3.bias"],
    }
    pruned = FashionCNN(
        state["head.3.weight"].shape[0],
        channels=(len(first), len(second)),
        hidden_units=len(hidden),
    )
    pruned.load_state_dict(sliced)
    return pruned


def _mlp_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _mlp_layers(model: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, _ in _mlp_linears(model)[:-1])


def _prune_mlp(model: nn.Module, fractions: Mapping[str, float]) -> nn.Module:
    linears = _mlp_linears(model)
    sliced: dict[str, torch.Tensor] = {}
    previous: torch.Tensor | None = None  # kept inputs of the current layer
    widths: list[int] = []
    for position, (name, linear) in enumerate(linears):
        weight = linear.weight.detach()
        if position < len(linears) - 1:
            kept = _top_l1(weight, _kept_count(weight.shape[0], fractions[name]))
        else:
            kept = torch.arange(weight.shape[0], device=weight.device)
        weight = weight[kept]
        sliced[f"{name}.weight"] = weight if previous is None else weight[:, previous]
        sliced[f"{name}.bias"] = linear.bias.detach()[kept]
        widths.append(len(kept))
        previous = kept
    pruned = FashionMLP(widths[-1], hidden_units=tuple(widths[:-1]))
    pruned.load_state_dict(sliced)
    return pruned


@dataclass(frozen=True, slots=True)
class _Pruner:
    layers: Callable[[nn.Module], tuple[str, ...]]
    prune: Callable[[nn.Module, Mapping[str, float]], nn.Module]


# Exact types: a subclass may change the architecture the slicing assumes.
_PRUNERS: dict[type[nn.Module], _Pruner] = {
    FashionCNN: _Pruner(_cnn_layers, _prune_cnn),
    FashionMLP: _Pruner(_mlp_layers, _prune_mlp),
}


def _pruner(model: nn.Module) -> _Pruner:
    pruner = _PRUNERS.get(type(model))
    if pruner is None:
        supported = sorted(kind.__name__ for kind in _PRUNERS)
        raise ConfigError(f"cannot prune a {type(model).__name__}; supported: {supported}")
    return pruner


def prunable_layers(model: nn.Module) -> tuple[str, ...]:
    """Return the module names whose output units :func:`prune_structured` can remove.

    These are the keys a per-layer ``keep_fraction`` mapping may use: for
    :class:`FashionCNN` ``features.0`` and ``features.4`` (conv channels) and ``head.1``
    (hidden units); for :class:`FashionMLP` every linear layer but the last.

    Raises
    ------
    ConfigError
        If ``model`` is neither a FashionCNN nor a FashionMLP.
    """
    return _pruner(model).layers(model)


def _check_fraction(label: str, fraction: float) -> None:
    if isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ConfigError(f"{label} must be in (0, 1], got {fraction!r}")


def prune_structured(model: nn.Module, *, keep_fraction: float | Mapping[str, float]) -> nn.Module:
    """Return a new, physically smaller model keeping each layer's highest-L1 units.

    Parameters
    ----------
    model
        A :class:`FashionCNN` or :class:`FashionMLP`; not modified.
    keep_fraction
        The fraction of output units (conv channels, hidden neurons) every prunable
        layer keeps, in (0, 1]; or a mapping from some of :func:`prunable_layers`'
        names to their own fraction (the layers it leaves out keep everything). The
        kept count is the fraction of the width rounded half up, at least one; conv
        channels are counted per GroupNorm group. The classifier keeps all outputs.

    Returns
    -------
    torch.nn.Module
        A model of the same class with narrower layers, on ``model``'s device and in
        its training mode. With ``keep_fraction=1.0`` it computes exactly what
        ``model`` computes.

    Raises
    ------
    ConfigError
        If the model is of another class, a fraction is outside (0, 1], or the
        mapping names a layer that cannot be pruned.
    """
    pruner = _pruner(model)
    names = pruner.layers(model)
    if isinstance(keep_fraction, Mapping):
        unknown = sorted(set(keep_fraction) - set(names))
        if unknown:
            raise ConfigError(
                f"keep_fraction names {unknown}, which {type(model).__name__} cannot prune; "
                f"prunable layers: {list(names)}"
            )
        for name, fraction in keep_fraction.items():
            _check_fraction(f"keep_fraction[{name!r}]", fraction)
        fractions = {name: float(keep_fraction.get(name, 1.0)) for name in names}
    else:
        _check_fraction("keep_fraction", keep_fraction)
        fractions = dict.fromkeys(names, float(keep_fraction))
    device = next(model.parameters()).device
    with torch.no_grad():
        pruned = pruner.prune(model, fractions)
    return pruned.to(device).train(model.training)


def compress(
    teacher: nn.Module,
    train: tuple[npt.NDArray[np.uint8], npt.NDArray[np.integer]],
    *,
    keep_fraction: float | Mapping[str, float],
    distill_config: DistillConfig,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> nn.Module:
    """Prune ``teacher`` with :func:`prune_structured`, then fine-tune it by :func:`distill`.

    Parameters
    ----------
    teacher
        The trained model; not modified (it is put in eval mode).
    train
        The transfer set ``(images, labels)``, uint8 images (N, 28, 28).
    keep_fraction
        As in :func:`prune_structured`.
    distill_config
        As ``config`` in :func:`distill`.
    generator, device
        As in :func:`distill`.

    Returns
    -------
    torch.nn.Module
        The fine-tuned student, on the CPU.

    Raises
    ------
    ConfigError
        As :func:`prune_structured` and :func:`distill` do.
    """
    student = prune_structured(teacher, keep_fraction=keep_fraction)
    images, labels = train
    return distill(
        teacher, student, images, labels, config=distill_config, generator=generator, device=device
    ).student
