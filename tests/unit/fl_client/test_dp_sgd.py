from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from edge_runtime.models import ModelName, build_model
from fedge.errors import ConfigError
from fl_client import per_example
from fl_client.dp_sgd import (
    DpSgdConfig,
    GradSampleMode,
    noise_multiplier_for,
    planned_spend,
    train_private,
)
from fl_client.training import TrainConfig, evaluate
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import AccountantKind, GaussianSteps, gaussian_epsilon
from tests.helpers import stripes

pytestmark = [
    # Opacus' hooks on a first layer whose input needs no gradient; RDP at a tiny sigma.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the (smallest|largest) alpha:UserWarning"),
]

RDP = AccountantKind.RDP
FULL_BATCH_STEP = TrainConfig(local_epochs=1, batch_size=10_000, learning_rate=1.0, momentum=0.0)


def _seeded(**kwargs: Any) -> DpSgdConfig:
    settings: dict[str, Any] = {"noise_multiplier": 1.0, "accountant": RDP, "secure_mode": False}
    return DpSgdConfig(**(settings | kwargs))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _tiny(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


class _MixedLayers(nn.Module):
    """Every layer option the book-keeping engine handles: stride, dilation, groups, no bias."""

    def __init__(self, *, dilated: bool) -> None:
        super().__init__()
        spread = 2 if dilated else 1
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=spread, dilation=spread)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.fc1 = nn.Linear(6 * 7 * 7, 16, bias=False)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.norm(self.conv1(images)))
        hidden = nn.functional.max_pool2d(torch.relu(self.conv2(hidden)), 2)
        logits: torch.Tensor = self.fc2(torch.relu(self.fc1(hidden.flatten(1))))
        return logits


def _mixed(*, dilated: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return _MixedLayers(dilated=dilated)


# --- Configuration ----------------------------------------------------------------------------


def test_defaults_are_the_production_settings() -> None:
    config = DpSgdConfig(noise_multiplier=1.0)

    assert config.secure_mode is True
    assert config.accountant is AccountantKind.PRV
    assert config.grad_sample_mode is GradSampleMode.BOOK_KEEPING
    assert config.max_grad_norm == 1.0
    assert config.delta == 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of noise_multiplier and target_epsilon"),
        ({"noise_multiplier": 1.0, "target_epsilon": 2.0}, "exactly one of"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0, got 0.0"),
        ({"noise_multiplier": math.inf}, "noise_multiplier must be a finite number > 0"),
        ({"noise_multiplier": True}, "noise_multiplier must be a finite number > 0"),
        ({"target_epsilon": -1.0}, "target_epsilon must be a finite number > 0, got -1.0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm must be a finite"),
        ({"noise_multiplier": 1.0, "max_grad_norm": math.nan}, "max_grad_norm must be a finite"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"noise_multiplier": 1.0, "accountant": "prv"}, "accountant must be an AccountantKind"),
        ({"noise_multiplier": 1.0, "secure_mode": 1}, "secure_mode must be a bool"),
        (
            {"noise_multiplier": 1.0, "grad_sample_mode": "hooks"},
            "grad_sample_mode must be a GradSampleMode",
        ),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DpSgdConfig(**kwargs)


def test_noise_multiplier_for_checks_its_arguments() -> None:
    with pytest.raises(ConfigError, match="target_epsilon must be a finite number > 0"):
        noise_multiplier_for(target_epsilon=0.0, delta=1e-5, sample_rate=0.1, steps=10)
    with pytest.raises(ConfigError, match=r"delta must be in \(0, 1\)"):
        noise_multiplier_for(target_epsilon=1.0, delta=2.0, sample_rate=0.1, steps=10)
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]"):
        noise_multiplier_for(target_epsilon=1.0, delta=1e-5, sample_rate=0.0, steps=10)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        noise_multiplier_for(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=0)
    with pytest.raises(ConfigError, match="no noise multiplier reaches epsilon 1e-09"):
        noise_multiplier_for(
            target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=1000, accountant=RDP
        )


# --- Accounting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "batch_size", "epochs", "sample_rate", "steps"),
    [
        (200, 32, 2, 0.16, 12),  # 1 / q = 6.25: Opacus runs int(1 / q) = 6 steps an epoch
        (640, 32, 1, 0.05, 20),
        (5, 32, 3, 1.0, 3),  # the batch is larger than the data: every example, every step
    ],
)
def test_spend_is_what_opacus_would_count(
    count: int, batch_size: int, epochs: int, sample_rate: float, steps: int
) -> None:
    images, labels = stripes(count, seed=0)
    config = TrainConfig(local_epochs=epochs, batch_size=batch_size)
    dp = _seeded()

    result = train_private(
        _tiny(), images, labels, config, dp, generator=torch.Generator().manual_seed(0)
    )

    opacus_steps = len(UniformWithReplacementSampler(num_samples=count, sample_rate=sample_rate))
    assert result.spend == GaussianSteps(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)
    assert result.spend.sample_rate == pytest.approx(min(1.0, batch_size / count))
    assert result.spend.steps == epochs * opacus_steps
    assert result.spend == planned_spend(count, config, dp)
    assert result.epsilon == gaussian_epsilon([result.spend], delta=1e-5, kind=RDP)
    assert result.delta == 1e-5
    assert result.num_examples == count


def test_target_epsilon_picks_the_noise_that_meets_it() -> None:
    images, labels = stripes(64, seed=0)
    config = TrainConfig(local_epochs=2, batch_size=16)
    dp = DpSgdConfig(target_epsilon=3.0, secure_mode=False)  # the default PRV accountant

    result = train_private(
        _tiny(), images, labels, config, dp, generator=torch.Generator().manual_seed(0)
    )

    chosen = result.spend.noise_multiplier
    assert chosen == noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=8)
    assert result.spend.sample_rate == 0.25
    assert result.spend.steps == 8
    # At most the target, and within Opacus' binary-search tolerance of it.
    assert 3.0 - 0.01 <= result.epsilon <= 3.0
    assert result.epsilon == pytest.approx(
        gaussian_epsilon([result.spend], delta=1e-5, kind=AccountantKind.PRV)
    )
    # Less noise would overspend.
    slightly_less = GaussianSteps(noise_multiplier=0.97 * chosen, sample_rate=0.25, steps=8)
    assert gaussian_epsilon([slightly_less], delta=1e-5, kind=AccountantKind.PRV) > 3.0


# --- Training ---------------------------------------------------------------------------------


def test_dp_sgd_learns_a_separable_task_with_small_noise() -> None:
    images, labels = stripes(160, seed=0)
    test_images, test_labels = stripes(200, seed=1)
    model = build_model(ModelName.CNN, seed=0)
    before = evaluate(model, test_images, test_labels)
    weights = _flat(model)

    result = train_private(
        model,
        images,
        labels,
        TrainConfig(local_epochs=3, batch_size=32, learning_rate=0.5, momentum=0.9),
        _seeded(noise_multiplier=0.5),
        generator=torch.Generator().manual_seed(0),
    )
    after = evaluate(model, test_images, test_labels)

    assert not torch.equal(_flat(model), weights)
    assert after.accuracy > 0.8
    assert after.loss < before.loss / 4
    assert math.isfinite(result.mean_loss)
    assert result.mean_loss < before.loss


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_one_added_example_moves_the_clipped_sum_by_exactly_the_clip(mode: GradSampleMode) -> None:
    # q = 1, one step, lr 1, no momentum: (before - after) * N is the sum of the clipped
    # per-example gradients (plus noise of std 1e-8). The fifth example's gradient is far
    # larger than C, so per-example clipping makes it move that sum by C, no more, no less.
    images, labels = stripes(5, seed=3)
    clip = 0.01
    dp = _seeded(noise_multiplier=1e-6, max_grad_norm=clip, grad_sample_mode=mode)

    def clipped_sum(count: int) -> torch.Tensor:
        model = build_model(ModelName.CNN, seed=0)
        weights = _flat(model)
        train_private(
            model,
            images[:count],
            labels[:count],
            FULL_BATCH_STEP,
            dp,
            generator=torch.Generator().manual_seed(0),
        )
        return (weights - _flat(model)) * count

    moved = float(torch.linalg.vector_norm(clipped_sum(5) - clipped_sum(4)))

    assert moved == pytest.approx(clip, rel=0.01)


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_every_engine_gives_the_book_keeping_update(mode: GradSampleMode) -> None:
    images, labels = stripes(12, seed=4)

    def update(model: nn.Module, engine: GradSampleMode) -> torch.Tensor:
        weights = _flat(model)
        dp = _seeded(noise_multiplier=1e-6, max_grad_norm=0.05, grad_sample_mode=engine)
        train_private(
            model, images, labels, FULL_BATCH_STEP, dp, generator=torch.Generator().manual_seed(0)
        )
        return weights - _flat(model)

    reference = update(build_model(ModelName.CNN, seed=1), GradSampleMode.BOOK_KEEPING)
    other = update(build_model(ModelName.CNN, seed=1), mode)

    assert torch.allclose(other, reference, rtol=1e-4, atol=1e-7)
    assert float(reference.norm()) > 1e-3


@pytest.mark.parametrize(
    ("frozen", "dilated"),
    [("", False), ("", True), ("conv1.bias", False), ("norm.weight", True), ("fc2.weight", False)],
)
def test_book_keeping_handles_strides_groups_no_biases_and_frozen_weights(
    frozen: str, dilated: bool
) -> None:
    images, labels = stripes(9, seed=5)
    updates = []
    for mode in (GradSampleMode.BOOK_KEEPING, GradSampleMode.HOOKS):
        model = _mixed(dilated=dilated)
        if frozen:
            model.get_parameter(frozen).requires_grad_(False)
        weights = _flat(model)
        dp = _seeded(noise_multiplier=1e-6, max_grad_norm=0.1, grad_sample_mode=mode)
        train_private(
            model, images, labels, FULL_BATCH_STEP, dp, generator=torch.Generator().manual_seed(0)
        )
        updates.append(weights - _flat(model))

    assert torch.allclose(updates[0], updates[1], rtol=1e-4, atol=1e-7)
    assert float(updates[0].norm()) > 1e-3


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_the_callers_model_keeps_its_keys_and_no_opacus_traces(mode: GradSampleMode) -> None:
    images, labels = stripes(16, seed=6)
    model = build_model(ModelName.CNN, seed=0)
    config = TrainConfig(batch_size=8)
    generator = torch.Generator().manual_seed(0)

    train_private(
        model, images, labels, config, _seeded(grad_sample_mode=mode), generator=generator
    )
    # A second round on the same model object: nothing left behind gets in the way.
    train_private(
        model, images, labels, config, _seeded(grad_sample_mode=mode), generator=generator
    )

    fresh = build_model(ModelName.CNN)
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert not any(key.startswith("_module") for key in model.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    for parameter in model.parameters():
        assert parameter.grad is None
        for attribute in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample"):
            assert not hasattr(parameter, attribute)
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._backward_hooks
        assert not hasattr(module, "autograd_grad_sample_hooks")


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_empty_poisson_batches_are_noise_only_steps(
    mode: GradSampleMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 examples, q = 1/3: a batch is empty with probability (2/3)^3, about 30 % of steps.
    images, labels = stripes(3, seed=7)
    model = build_model(ModelName.CNN, seed=0)
    weights = _flat(model)
    steps_taken: list[int] = []
    original_step = torch.optim.SGD.step

    def counting_step(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        steps_taken.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)

    result = train_private(
        model,
        images,
        labels,
        TrainConfig(local_epochs=10, batch_size=1, learning_rate=0.1),
        _seeded(grad_sample_mode=mode),
        generator=torch.Generator().manual_seed(0),
    )

    assert result.spend.steps == 30
    assert 0 < result.empty_steps < 30
    # Every step, empty or not, is an optimiser step with noise (the accounting assumes it).
    assert len(steps_taken) == 30
    assert math.isfinite(result.mean_loss)
    assert torch.isfinite(_flat(model)).all()
    assert not torch.equal(_flat(model), weights)


def test_empty_batches_still_add_noise_of_the_accounted_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Force every Poisson batch to be empty: the update is then the noise alone, with
    # lr 1 and no momentum sum_t N(0, (sigma C)^2) / (q N) per coordinate.
    monkeypatch.setattr(
        per_example.SeededRandomness,
        "uniform",
        lambda self, count: torch.ones(count, dtype=torch.float64),
    )
    images, labels = stripes(40, seed=8)
    model = build_model(ModelName.CNN, seed=0)
    weights = _flat(model)
    config = TrainConfig(batch_size=10, learning_rate=1.0, momentum=0.0)

    result = train_private(
        model,
        images,
        labels,
        config,
        _seeded(noise_multiplier=2.0, max_grad_norm=0.5),
        generator=torch.Generator().manual_seed(0),
    )

    assert result.spend.steps == 4
    assert result.empty_steps == 4
    assert math.isnan(result.mean_loss)
    expected_std = 2.0 * 0.5 * math.sqrt(4) / 10
    assert float((_flat(model) - weights).std()) == pytest.approx(expected_std, rel=0.02)


# --- Randomness -------------------------------------------------------------------------------


def test_seeded_mode_is_reproducible_and_secure_mode_never_is() -> None:
    images, labels = stripes(32, seed=9)
    config = TrainConfig(batch_size=8)

    def run(secure: bool) -> torch.Tensor:
        model = _tiny()
        dp = _seeded(secure_mode=secure)
        train_private(model, images, labels, config, dp, generator=torch.Generator().manual_seed(1))
        return _flat(model)

    assert torch.equal(run(secure=False), run(secure=False))
    # The same seeded generator: the CSPRNG ignores it, so the noise is fresh each time.
    assert not torch.equal(run(secure=True), run(secure=True))


def test_csprng_normals_and_uniforms_have_the_right_distribution() -> None:
    randomness = per_example.CsprngRandomness(DeterministicRandom(11))

    normals = randomness.normal(200_001)
    uniforms = randomness.uniform(200_000)

    assert normals.shape == (200_001,)
    assert normals.dtype == torch.float64
    assert abs(float(normals.mean())) < 0.01
    assert float(normals.std()) == pytest.approx(1.0, abs=0.01)
    assert float((normals.abs() > 1.959964).double().mean()) == pytest.approx(0.05, abs=0.003)
    assert float(uniforms.min()) >= 0.0
    assert float(uniforms.max()) < 1.0
    assert float(uniforms.mean()) == pytest.approx(0.5, abs=0.003)
    # 53 random bits: the low bit is set about half the time.
    low_bits = (uniforms * 2.0**53).to(torch.int64) & 1
    assert float(low_bits.double().mean()) == pytest.approx(0.5, abs=0.01)


# --- What is refused --------------------------------------------------------------------------


def _unchanged_after(
    model: nn.Module, call: Callable[[], object], error: type[Exception], message: str
) -> None:
    model.eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(error, match=message):
        call()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert not model.training


def test_a_batchnorm_model_is_refused_not_fixed() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
    )
    images, labels = stripes(8, seed=0)

    _unchanged_after(
        model,
        lambda: train_private(
            model, images, labels, TrainConfig(), _seeded(), generator=torch.Generator()
        ),
        ConfigError,
        "cannot be trained with per-example gradients: .*BatchNorm",
    )
    assert isinstance(model[1], nn.BatchNorm2d)


def test_empty_or_mismatched_data_is_refused() -> None:
    model = _tiny()
    images, labels = stripes(8, seed=0)
    generator = torch.Generator()

    with pytest.raises(ConfigError, match="empty partition"):
        train_private(model, images[:0], labels[:0], TrainConfig(), _seeded(), generator=generator)
    with pytest.raises(ConfigError, match="8 images but 7 labels"):
        train_private(model, images, labels[:7], TrainConfig(), _seeded(), generator=generator)
    with pytest.raises(ConfigError, match=r"shape \(N, H, W\)"):
        train_private(
            model, images.reshape(8, -1), labels, TrainConfig(), _seeded(), generator=generator
        )
    with pytest.raises(ConfigError, match="empty partition"):
        planned_spend(0, TrainConfig(), _seeded())


def test_an_unreachable_target_trains_nothing() -> None:
    model = _tiny()
    images, labels = stripes(8, seed=0)
    dp = DpSgdConfig(target_epsilon=1e-9, accountant=RDP, secure_mode=False)

    _unchanged_after(
        model,
        lambda: train_private(
            model, images, labels, TrainConfig(), dp, generator=torch.Generator()
        ),
        ConfigError,
        "no noise multiplier reaches",
    )


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.LayerNorm(8), nn.Linear(8, 10)),
            "BOOK_KEEPING supports Conv2d, Linear and GroupNorm; 2 is a LayerNorm",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(1568, 10)),
            "needs integer zero padding; 0 has padding='same'",
        ),
        (
            nn.Sequential(
                nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                nn.Flatten(),
                nn.Linear(1568, 10),
            ),
            "padding_mode='reflect'",
        ),
    ],
)
def test_book_keeping_refuses_layers_it_cannot_handle(model: nn.Module, message: str) -> None:
    images, labels = stripes(4, seed=0)

    _unchanged_after(
        model,
        lambda: train_private(
            model, images, labels, TrainConfig(), _seeded(), generator=torch.Generator()
        ),
        ConfigError,
        message,
    )


def test_opacus_hooks_train_what_book_keeping_refuses() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    images, labels = stripes(4, seed=0)
    weights = _flat(model)

    train_private(
        model,
        images,
        labels,
        TrainConfig(),
        _seeded(grad_sample_mode=GradSampleMode.HOOKS),
        generator=torch.Generator(),
    )

    assert not torch.equal(_flat(model), weights)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Linear(784, 784)
        self.out = nn.Linear(784, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(self.square(self.square(images.flatten(1))))
        return logits


def test_book_keeping_refuses_a_layer_used_twice() -> None:
    model = _Shared()
    images, labels = stripes(4, seed=0)
    weights = _flat(model)

    with pytest.raises(ConfigError, match="a layer ran twice in one forward pass"):
        train_private(model, images, labels, TrainConfig(), _seeded(), generator=torch.Generator())

    assert torch.equal(_flat(model), weights)  # refused at the first forward pass
    assert not model.square._forward_hooks  # and the engine's hooks are gone


def test_models_without_float32_trainable_parameters_are_refused() -> None:
    images, labels = stripes(4, seed=0)
    frozen = _tiny()
    frozen.requires_grad_(False)

    with pytest.raises(ConfigError, match="no trainable parameters"):
        train_private(frozen, images, labels, TrainConfig(), _seeded(), generator=torch.Generator())
    with pytest.raises(ConfigError, match="float32 parameters only"):
        train_private(
            _tiny().double(), images, labels, TrainConfig(), _seeded(), generator=torch.Generator()
        )
