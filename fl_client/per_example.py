"""Per-example gradient engines and randomness of DP-SGD (used by :mod:`fl_client.dp_sgd`).

Each engine returns the sum of the per-example gradients clipped to ``max_grad_norm``:
``BOOK_KEEPING`` (fedge's own, after Bu et al., ICML 2023) or one of Opacus' grad-sample
modes. The randomness is the OS CSPRNG (AES-256-CTR, fresh key per draw) or, for tests and
simulations only, a seeded ``torch.Generator``. See :mod:`fl_client.dp_sgd` for the why.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Protocol

import numpy as np
import torch
from opacus.grad_sample import (
    GradSampleModule,
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.nn import functional
from torch.nn.grad import conv2d_weight

from fedge.errors import ConfigError
from secure_agg.prg import SEED_BYTES, expand_mask
from secure_agg.randomness import RandomSource

__all__ = [
    "CsprngRandomness",
    "Engine",
    "GradSampleMode",
    "Randomness",
    "SeededRandomness",
    "make_engine",
]

_LOW_53_BITS = (1 << 53) - 1
_TWO_TO_MINUS_53 = 2.0**-53
# Opacus' clip factor: min(1, C / (norm + 1e-6)); the 1e-6 also guards a zero gradient.
_NORM_EPSILON = 1e-6


class GradSampleMode(Enum):
    """How per-example gradients are computed (all give the same clipped update)."""

    BOOK_KEEPING = "book_keeping"
    HOOKS = "hooks"
    GHOST = "ghost"
    FUNCTORCH = "functorch"
    EXPANDED_WEIGHTS = "ew"


# --- Randomness -----------------------------------------------------------------------------


class Randomness(Protocol):
    """The Poisson sample's uniforms and the noise's normals of DP-SGD."""

    def uniform(self, count: int) -> torch.Tensor:
        """Return ``count`` float64 uniforms on [0, 1)."""
        ...

    def normal(self, count: int) -> torch.Tensor:
        """Return ``count`` float64 standard normals."""
        ...


class CsprngRandomness:
    """Uniforms and normals (float64) from AES-256-CTR under a fresh CSPRNG key per draw."""

    def __init__(self, source: RandomSource) -> None:
        self._source = source

    def uniform(self, count: int) -> torch.Tensor:
        """Return ``count`` uniforms with 53 random bits each, from a fresh CSPRNG key."""
        words = expand_mask(self._source.random_bytes(SEED_BYTES), count, np.dtype(np.uint64))
        # The low 53 bits of each word: a float64 in [0, 1) with every bit random.
        bits = torch.from_numpy(words.view(np.int64)).bitwise_and_(_LOW_53_BITS)
        return bits.to(torch.float64).mul_(_TWO_TO_MINUS_53)

    def normal(self, count: int) -> torch.Tensor:
        """Return ``count`` standard normals (Box-Muller on CSPRNG uniforms)."""
        half = (count + 1) // 2
        uniforms = self.uniform(2 * half)
        # Box-Muller; 1 - u is in (0, 1], so the logarithm is finite.
        radius = torch.sqrt(torch.log1p(-uniforms[:half]) * -2.0)
        angle = uniforms[half:] * (2.0 * math.pi)
        return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:count]


class SeededRandomness:
    """The caller's torch generator: reproducible, predictable, never for production."""

    def __init__(self, generator: torch.Generator) -> None:
        self._generator = generator

    def uniform(self, count: int) -> torch.Tensor:
        """Return ``count`` uniforms from the seeded generator."""
        return torch.rand(count, generator=self._generator, dtype=torch.float64)

    def normal(self, count: int) -> torch.Tensor:
        """Return ``count`` normals from the seeded generator."""
        # float32 draws (4x faster than float64 ones): resolution is moot for seeded noise.
        return torch.randn(count, generator=self._generator).to(torch.float64)


# --- Per-example gradients: each engine returns the sum of the clipped gradients --------------


class Engine(Protocol):
    """Computes the sum of per-example gradients clipped to the norm bound."""

    def clipped_sum(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], float]:
        """Return the clipped gradient sum per parameter and the batch's summed loss."""
        ...

    def close(self) -> None:
        """Remove every hook and attribute the engine added to the model."""
        ...


_Layer = nn.Conv2d | nn.Linear | nn.GroupNorm


class _BookKeepingEngine:
    """One backward pass to the layer outputs; per-example norms and clipped sums from (a, b)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], max_grad_norm: float) -> None:
        self._model = model
        self._params = params
        self._max_grad_norm = max_grad_norm
        self._layers = _book_keeping_layers(model)
        self._captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [layer.register_forward_hook(self._capture) for layer in self._layers]

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if module in self._captured:
            raise ConfigError(
                "a layer ran twice in one forward pass (shared weights): "
                "GradSampleMode.BOOK_KEEPING cannot attribute its gradient; use HOOKS"
            )
        self._captured[module] = (inputs[0].detach(), output)

    def clipped_sum(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], float]:
        self._captured.clear()
        try:
            loss = functional.cross_entropy(self._model(inputs), targets, reduction="sum")
            used = [
                (layer, *self._captured[layer]) for layer in self._layers if layer in self._captured
            ]
        finally:
            self._captured.clear()
        # Only the gradients of the layer outputs: autograd skips every weight gradient.
        backprops = torch.autograd.grad(loss, [output for _, _, output in used], allow_unused=True)
        squared = torch.zeros(inputs.shape[0])
        parts = [
            (layer, *_per_example(layer, activation, backprop, squared))
            for (layer, activation, _), backprop in zip(used, backprops, strict=True)
            if backprop is not None
        ]
        factors = _clip_factors(squared, self._max_grad_norm)
        sums: dict[int, torch.Tensor] = {}
        for layer, weight_part, bias_part in parts:
            if isinstance(layer, nn.Linear):
                scaled = bias_part * factors[:, None]  # the clipped output gradients
                sums[id(layer.weight)] = scaled.T @ weight_part
                bias_sum = scaled.sum(0)
            else:
                if layer.weight.requires_grad:
                    sums[id(layer.weight)] = (factors @ weight_part).view_as(layer.weight)
                bias_sum = factors @ bias_part
            if layer.bias is not None:
                sums[id(layer.bias)] = bias_sum  # unused when the bias is frozen
        # A parameter the forward pass did not reach contributes nothing.
        summed = [sums.get(id(p), torch.zeros_like(p)) for p in self._params]
        return summed, float(loss.detach()) / inputs.shape[0]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _book_keeping_layers(model: nn.Module) -> list[_Layer]:
    layers: list[_Layer] = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if not isinstance(module, nn.Conv2d | nn.Linear | nn.GroupNorm):
            raise ConfigError(
                "GradSampleMode.BOOK_KEEPING supports Conv2d, Linear and GroupNorm; "
                f"{name or 'the model'} is a {type(module).__name__} with parameters "
                "(use GradSampleMode.HOOKS)"
            )
        if isinstance(module, nn.Conv2d) and (
            isinstance(module.padding, str) or module.padding_mode != "zeros"
        ):
            raise ConfigError(
                f"GradSampleMode.BOOK_KEEPING needs integer zero padding; {name} has "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
            )
        layers.append(module)
    return layers


def _per_example(
    layer: _Layer, activation: torch.Tensor, backprop: torch.Tensor, squared: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each example's squared gradient norm in ``layer`` to ``squared``; return the parts.

    Linear: (input, output gradient), never multiplied out. Conv2d and GroupNorm: the
    per-example weight and bias gradients, (N, -1) each.
    """
    count = activation.shape[0]
    # A frozen weight or bias is no part of the gradient that is clipped (as in Opacus).
    weight_trains = layer.weight.requires_grad
    bias_trains = layer.bias is not None and layer.bias.requires_grad
    if isinstance(layer, nn.Linear):
        if activation.dim() != 2:
            raise ConfigError(
                "GradSampleMode.BOOK_KEEPING needs Linear inputs of shape (N, features)"
            )
        out_squared = _row_squares(backprop)
        # ||b_i a_i^T||^2 = ||a_i||^2 ||b_i||^2, and example i's bias gradient is b_i.
        if weight_trains:
            squared += _row_squares(activation) * out_squared
        if bias_trains:
            squared += out_squared
        return activation, backprop
    per_weight = torch.empty(0)
    if weight_trains and isinstance(layer, nn.Conv2d):
        per_weight = _conv_per_example(layer, activation, backprop).reshape(count, -1)
    elif weight_trains:  # GroupNorm: y = x_hat * weight + bias, per channel
        assert isinstance(layer, nn.GroupNorm)
        normalised = functional.group_norm(activation, layer.num_groups, eps=layer.eps)
        per_weight = (normalised * backprop).flatten(2).sum(2)
    per_bias = backprop.flatten(2).sum(2)
    if weight_trains:
        squared += _row_squares(per_weight)
    if bias_trains:
        squared += _row_squares(per_bias)
    return per_weight, per_bias


def _row_squares(matrix: torch.Tensor) -> torch.Tensor:
    # No squared copy of the matrix: a fresh (N, 12800) buffer per step costs page faults.
    norms: torch.Tensor = torch.linalg.vector_norm(matrix, dim=1)
    return norms.square_()


def _conv_per_example(
    layer: nn.Conv2d, activation: torch.Tensor, backprop: torch.Tensor
) -> torch.Tensor:
    """Return every example's weight gradient of ``layer``, shape (N, *weight.shape)."""
    count = activation.shape[0]
    weight = layer.weight
    if layer.groups == 1 and layer.in_channels == 1:
        # A one-channel input layer: correlate each example's input with its own output
        # gradients (the examples as groups, stride and dilation swapped); about 0.3 ms a
        # step faster than the grouped weight gradient below on the FashionCNN's first layer.
        correlated = functional.conv2d(
            activation.transpose(0, 1),
            backprop.reshape(-1, 1, *backprop.shape[2:]),
            stride=layer.dilation,
            padding=layer.padding,
            dilation=layer.stride,
            groups=count,
        )
        return correlated[:, :, : weight.shape[2], : weight.shape[3]].reshape(count, *weight.shape)
    # Example i's weight gradient is that of a convolution whose groups are the
    # (example, group) pairs: one grouped weight-gradient convolution for the batch.
    grads: torch.Tensor = conv2d_weight(  # type: ignore[no-untyped-call]
        activation.reshape(1, -1, *activation.shape[2:]),
        [count * weight.shape[0], *weight.shape[1:]],
        backprop.reshape(1, -1, *backprop.shape[2:]),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=count * layer.groups,
    )
    return grads.view(count, *weight.shape)


def _clip_factors(squared_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    return (max_grad_norm / (squared_norms.sqrt() + _NORM_EPSILON)).clamp(max=1.0)


class _OpacusEngine:
    """Opacus' per-example gradients and Opacus' own clipping code (its optimizer, noise 0)."""

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        max_grad_norm: float,
        mode: GradSampleMode,
    ) -> None:
        self._params = params
        # Never stepped: only its Opacus wrapper's clipping (and zero_grad) is used.
        inner = torch.optim.SGD(params, lr=1.0)
        self._criterion: Any = None
        self._module: Any
        if mode is GradSampleMode.GHOST:
            self._module = GradSampleModuleFastGradientClipping(
                model, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True
            )
            self._optimizer: Any = DPOptimizerFastGradientClipping(
                inner,
                noise_multiplier=0.0,
                max_grad_norm=max_grad_norm,
                expected_batch_size=None,
                loss_reduction="sum",
            )
            self._criterion = DPLossFastGradientClipping(
                self._module, self._optimizer, nn.CrossEntropyLoss(reduction="sum"), "sum"
            )
        else:
            if mode is GradSampleMode.EXPANDED_WEIGHTS:
                self._module = GradSampleModuleExpandedWeights(model, loss_reduction="sum")
            else:
                self._module = GradSampleModule(
                    model, loss_reduction="sum", force_functorch=mode is GradSampleMode.FUNCTORCH
                )
            self._optimizer = DPOptimizer(
                inner,
                noise_multiplier=0.0,
                max_grad_norm=max_grad_norm,
                expected_batch_size=None,
                loss_reduction="sum",
            )

    def clipped_sum(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], float]:
        self._optimizer.zero_grad(set_to_none=True)
        logits = self._module(inputs)
        if self._criterion is not None:
            ghost_loss = self._criterion(logits, targets)
            ghost_loss.backward()  # both of ghost clipping's passes: p.grad is the clipped sum
            sums = [_detached(p.grad, p) for p in self._params]
            loss_sum = float(ghost_loss.item())
        else:
            loss = functional.cross_entropy(logits, targets, reduction="sum")
            torch.autograd.backward(loss)
            self._optimizer.clip_and_accumulate()  # Opacus' clipping into p.summed_grad
            sums = [_detached(getattr(p, "summed_grad", None), p) for p in self._params]
            loss_sum = float(loss.detach())
        self._optimizer.zero_grad(set_to_none=True)
        return sums, loss_sum / inputs.shape[0]

    def close(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        self._module.cleanup()  # removes Opacus' hooks and attributes from the caller's model
        for p in self._params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad


def _detached(gradient: torch.Tensor | None, parameter: nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(parameter) if gradient is None else gradient.detach().clone()


def make_engine(
    mode: GradSampleMode, model: nn.Module, params: list[nn.Parameter], max_grad_norm: float
) -> Engine:
    """Return the engine of ``mode`` for ``model``'s trainable ``params``."""
    if mode is GradSampleMode.BOOK_KEEPING:
        return _BookKeepingEngine(model, params, max_grad_norm)
    return _OpacusEngine(model, params, max_grad_norm, mode)
