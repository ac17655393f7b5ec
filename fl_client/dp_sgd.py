"""Sample-level DP-SGD on a device: per-example clipping, Gaussian noise, Poisson batches.

The mechanism is DP-SGD (Abadi et al., CCS 2016) as Opacus runs it. Each step
draws a Poisson batch (every local example independently with probability
q = batch_size / N), clips every example's gradient to L2 norm C
(``max_grad_norm``), sums them, adds N(0, (sigma C)^2) to every coordinate,
divides by the expected batch size q N and takes an SGD step. A call is
``steps`` compositions of the sampled Gaussian mechanism (sigma, q) under
add/remove-one-example adjacency, accounted by :mod:`strategies.accounting`
(Opacus' PRV or RDP accountant) and reported as a :class:`GaussianSteps`.

Notes
-----
**Randomness (``secure_mode``).** Opacus' ``secure_mode`` draws noise and
batches from ``torchcsprng``; ``PrivacyEngine(secure_mode=True)`` raises
``ImportError`` without it, and that package (archived, no torch 2.x wheel)
cannot be installed. Opacus' other option, ``noise_generator``, takes a
``torch.Generator``: on CPU a Mersenne Twister, whose state can be recovered
from its outputs however it was seeded. So with ``secure_mode`` (the default)
the Poisson sample and the noise both come from AES-256-CTR under a fresh key
of 32 bytes from the OS CSPRNG for every draw (:func:`secure_agg.prg.expand_mask`);
sampling amplifies privacy only if the sample is secret. Normals are
Box-Muller on 53-bit uniforms in float64; the clipped sum and the noise are
added in float64 and rounded once to float32. Opacus' secure mode resists
floating-point attacks on the noise (Jin et al., S&P 2022) by summing four
float32 normals (Holohan and Braghin, ESORICS 2021); here the noise has
float64 resolution, 2^29 times finer than the float32 result, which aims at
the same gaps differently and is argued, not proven. It costs about 1 ms a
step for 114k parameters. With ``secure_mode=False`` the caller's seeded
generator drives both: reproducible, for tests and simulations only.

**What is Opacus and what is not.** Clipping (factor min(1, C / (||g|| +
1e-6))), the sampling rule (``uniform < q``, ``int(1 / q)`` steps an epoch),
the accountants and the noise search (``get_noise_multiplier``, as in
``make_private_with_epsilon``) are Opacus'. ``PrivacyEngine`` is not used: it
fixes q = 1 / ceil(N / batch_size), not batch_size / N, and its noise source
is the generator above. Per-example gradients come from Opacus
(``HOOKS``, ``GHOST``, ``FUNCTORCH``, ``EXPANDED_WEIGHTS``, each clipped by
Opacus' optimizer code) or, by default, from ``BOOK_KEEPING`` (Bu et al.,
"Differentially Private Optimization on Large Model at Small Cost", ICML
2023): one backward pass that asks autograd for the layers' output gradients
only, then per-example norms and the clipped sum from inputs and output
gradients: convolutions by one grouped convolution over the batch, linear
layers by ||a b^T|| = ||a|| ||b|| without materialising a b^T. It handles
``Conv2d`` (zero padding), ``Linear`` (2-D inputs) and ``GroupNorm`` and
refuses anything else; the tests hold it to Opacus' hooks. On the FashionCNN
a DP-SGD epoch costs about 1.4x a non-private one (Opacus' hooks: 2.6x;
``python -m benchmarks.dp_sgd_epoch``).

**Empty Poisson batches** are not skipped: the step still adds noise and
moves the model, as the analysis of the sampled Gaussian mechanism assumes
(skipping would reveal the empty batch). Only the forward pass is skipped:
Opacus' functorch and expanded-weights modes crash on an empty batch, and a
mean loss over no examples is NaN.

**Outside the guarantee**: ``mean_loss`` and ``num_examples`` come from the
private data without noise; do not release them where the sample-level
guarantee must cover everything a device sends.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from edge_runtime.models import InputEncoding, to_tensor
from fedge.errors import ConfigError
from fl_client.per_example import (
    CsprngRandomness,
    GradSampleMode,
    Randomness,
    SeededRandomness,
    make_engine,
)
from fl_client.training import TrainConfig
from secure_agg.randomness import SystemRandomSource
from strategies.accounting import AccountantKind, GaussianSteps, gaussian_epsilon

__all__ = [
    "DpSgdConfig",
    "GradSampleMode",
    "PrivateTrainResult",
    "noise_multiplier_for",
    "planned_spend",
    "poisson_schedule",
    "train_private",
]


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DpSgdConfig:
    """Sample-level DP-SGD settings of one training call.

    Parameters
    ----------
    max_grad_norm
        C, the L2 bound of each example's gradient, > 0.
    noise_multiplier
        sigma, the noise standard deviation over C, > 0. Give exactly one of
        this and ``target_epsilon``.
    target_epsilon
        Choose sigma so that this call spends at most this epsilon at ``delta``.
    delta
        The delta of the reported epsilon, in (0, 1).
    accountant
        The analysis of the subsampled Gaussian. PRV is tighter, but Opacus' PRV
        needs gigabytes below sigma ~ 0.3 with many steps; use RDP there.
    secure_mode
        Draw the Poisson sample and the noise from the OS CSPRNG (production);
        ``False`` uses the caller's seeded generator (tests and simulations).
    grad_sample_mode
        How per-example gradients are computed.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: AccountantKind = AccountantKind.PRV
    secure_mode: bool = True
    grad_sample_mode: GradSampleMode = GradSampleMode.BOOK_KEEPING

    def __post_init__(self) -> None:
        _positive("max_grad_norm", self.max_grad_norm)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not isinstance(self.accountant, AccountantKind):
            raise ConfigError(f"accountant must be an AccountantKind, got {self.accountant!r}")
        if not isinstance(self.secure_mode, bool):
            raise ConfigError(f"secure_mode must be a bool, got {self.secure_mode!r}")
        if not isinstance(self.grad_sample_mode, GradSampleMode):
            raise ConfigError(
                f"grad_sample_mode must be a GradSampleMode, got {self.grad_sample_mode!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivateTrainResult:
    """What a DP-SGD call reports.

    Parameters
    ----------
    num_examples
        N, the local examples (not private: see the module notes).
    mean_loss
        Mean batch loss over the steps whose batch was not empty (NaN if none was).
    spend
        The privacy this call spent: sigma, q = batch_size / N and the steps.
    epsilon
        epsilon(delta) of ``spend`` alone, by the configured accountant.
    delta
        The delta of ``epsilon``.
    empty_steps
        Steps whose Poisson batch was empty (noise only).
    """

    num_examples: int
    mean_loss: float
    spend: GaussianSteps
    epsilon: float
    delta: float
    empty_steps: int


def poisson_schedule(num_examples: int, train_config: TrainConfig) -> tuple[float, int]:
    """Return q and the number of steps, exactly as Opacus' Poisson sampler counts them."""
    sample_rate = min(1.0, train_config.batch_size / num_examples)
    # Opacus runs int(1 / q) steps per epoch; N // batch_size is that without float rounding.
    steps_per_epoch = max(1, num_examples // train_config.batch_size)
    return sample_rate, steps_per_epoch * train_config.local_epochs


@functools.lru_cache(maxsize=64)
def _cached_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} "
            f"in {steps} steps of sample rate {sample_rate}"
        ) from exc


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind = AccountantKind.PRV,
) -> float:
    """Return the smallest sigma (to Opacus' 0.01 tolerance in epsilon) that meets the target.

    Opacus' ``get_noise_multiplier`` (what ``make_private_with_epsilon`` uses),
    memoised in this process. A ClientApp keeps the answer in the device's own
    Context instead (:mod:`fl_client.noise_plan`): Flower's simulation serves a
    device from another process from round to round, and no two devices share
    inputs (each partition's size gives its own sample rate).

    Raises
    ------
    ConfigError
        If an argument is out of range or no sigma up to 10^6 reaches the target.
    """
    _positive("target_epsilon", target_epsilon)
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    # Validates sample_rate and steps with GaussianSteps' own messages.
    GaussianSteps(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)
    return _cached_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant.value)


@functools.lru_cache(maxsize=64)
def _epsilon_of(spend: GaussianSteps, delta: float, accountant: AccountantKind) -> float:
    # Pure and costly (PRV: ~0.1 s), and a device pays it with the same spend every round.
    return gaussian_epsilon([spend], delta=delta, kind=accountant)


def planned_spend(num_examples: int, train_config: TrainConfig, dp: DpSgdConfig) -> GaussianSteps:
    """Return what :func:`train_private` on ``num_examples`` examples will spend.

    The same numbers the call reports, known before it runs (for a budget check):
    q = min(1, batch_size / N), ``local_epochs * max(1, N // batch_size)`` steps,
    and sigma (found for ``target_epsilon`` over those steps when it is set).

    Raises
    ------
    ConfigError
        If ``num_examples`` is < 1 or the target epsilon cannot be met.
    """
    if num_examples < 1:
        raise ConfigError("cannot train on an empty partition")
    sample_rate, steps = poisson_schedule(num_examples, train_config)
    if dp.noise_multiplier is not None:
        noise = dp.noise_multiplier
    else:
        assert dp.target_epsilon is not None  # DpSgdConfig guarantees one of the two
        noise = noise_multiplier_for(
            target_epsilon=dp.target_epsilon,
            delta=dp.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=dp.accountant,
        )
    return GaussianSteps(noise_multiplier=noise, sample_rate=sample_rate, steps=steps)


# --- The training loop ------------------------------------------------------------------------


def _check_model(model: nn.Module) -> list[nn.Parameter]:
    was_training = model.training
    model.train()  # Opacus' validator refuses a model in eval mode
    try:
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if errors:
        raise ConfigError(
            "model cannot be trained with per-example gradients: "
            + "; ".join(str(error) for error in errors)
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model has no trainable parameters")
    if {p.dtype for p in params} != {torch.float32}:
        raise ConfigError("DP-SGD trains float32 parameters only")
    return params


def train_private(
    model: nn.Module,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.integer],
    train_config: TrainConfig,
    dp: DpSgdConfig,
    *,
    generator: torch.Generator,
    encoding: InputEncoding = InputEncoding.UINT8_IMAGES,
) -> PrivateTrainResult:
    """Train ``model`` in place with DP-SGD on the given examples.

    Parameters
    ----------
    model
        The model, modified in place; its ``state_dict`` keeps its own keys (no
        Opacus wrapper stays behind: hooks and per-example attributes are removed).
    images, labels
        The local examples.
    train_config
        Epochs (``local_epochs * max(1, N // batch_size)`` steps), expected batch
        size, learning rate and momentum of SGD.
    dp
        Clipping, noise (or target epsilon), accountant, randomness, engine.
    generator
        With ``dp.secure_mode=False``, the source of the Poisson sample and the
        noise. With ``secure_mode`` it is not consulted: a seeded generator must
        never drive production noise (both then come from the OS CSPRNG).
    encoding
        How ``images`` become the model's input (uint8 images, or float features).

    Returns
    -------
    PrivateTrainResult
        Examples, mean loss, and the spend and epsilon of this call.

    Raises
    ------
    ConfigError
        If there are no examples, images and labels disagree in length, the model
        has a layer DP-SGD cannot train (BatchNorm) or the engine cannot handle,
        or the target epsilon cannot be met. Nothing is trained then.

    Notes
    -----
    Everything is checked and accounted before the first step, so an impossible
    configuration never leaves a half-trained model.
    """
    if len(images) == 0:
        raise ConfigError("cannot train on an empty partition")
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    spend = planned_spend(len(images), train_config, dp)
    epsilon = _epsilon_of(spend, dp.delta, dp.accountant)
    params = _check_model(model)
    inputs = to_tensor(images, encoding)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    randomness: Randomness = (
        CsprngRandomness(SystemRandomSource()) if dp.secure_mode else SeededRandomness(generator)
    )
    noise_std = spend.noise_multiplier * dp.max_grad_norm
    expected_batch = spend.sample_rate * len(inputs)
    sizes = [p.numel() for p in params]
    num_values = sum(sizes)
    optimiser = torch.optim.SGD(
        params, lr=train_config.learning_rate, momentum=train_config.momentum
    )
    engine = make_engine(dp.grad_sample_mode, model, params, dp.max_grad_norm)
    # FedProx's proximal gradient mu (w - w_global) depends on no example: adding it
    # after the noise is post-processing and costs no privacy.
    anchors = [p.detach().clone() for p in params] if train_config.proximal_mu else []
    model.train()
    total_loss = 0.0
    empty_steps = 0
    try:
        for _ in range(spend.steps):
            chosen = torch.nonzero(randomness.uniform(len(inputs)) < spend.sample_rate).squeeze(1)
            if len(chosen) == 0:
                sums = [torch.zeros_like(p) for p in params]  # noise only: see the module notes
                empty_steps += 1
            else:
                sums, batch_loss = engine.clipped_sum(inputs[chosen], targets[chosen])
                total_loss += batch_loss
            # Clipped sum plus noise in float64, divided, then rounded once into float32.
            noisy = torch.cat([s.reshape(-1) for s in sums]).to(torch.float64)
            noisy.add_(randomness.normal(num_values), alpha=noise_std).div_(expected_batch)
            for p, grad in zip(params, torch.split(noisy.float(), sizes), strict=True):
                p.grad = grad.view_as(p)
            for p, anchor in zip(params, anchors, strict=False):
                assert p.grad is not None  # set just above
                p.grad.add_(p.detach() - anchor, alpha=train_config.proximal_mu)
            optimiser.step()
    finally:
        engine.close()
        optimiser.zero_grad(set_to_none=True)
    loss_steps = spend.steps - empty_steps
    return PrivateTrainResult(
        num_examples=len(inputs),
        mean_loss=total_loss / loss_steps if loss_steps else math.nan,
        spend=spend,
        epsilon=epsilon,
        delta=dp.delta,
        empty_steps=empty_steps,
    )
