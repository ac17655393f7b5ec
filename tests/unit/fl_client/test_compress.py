"""Structured pruning that really removes units, and distillation into the pruned student."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edge_runtime.export import export_onnx
from edge_runtime.models import FashionCNN, FashionMLP
from fedge.errors import ConfigError
from fl_client.compress import compress, prunable_layers, prune_structured
from fl_client.distill import DistillConfig, Optimiser, distill
from fl_client.training import TrainConfig, images_to_tensor, train
from tests.helpers import stripes


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _seeded(factory: type[nn.Module], seed: int, **widths: object) -> nn.Module:
    torch.manual_seed(seed)
    return factory(**widths)


def _parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _agreement(first: nn.Module, second: nn.Module, images: np.ndarray) -> float:
    inputs = images_to_tensor(images)
    with torch.no_grad():
        return float((first(inputs).argmax(1) == second(inputs).argmax(1)).float().mean())


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


TRAIN = stripes(512, seed=0)
HELD_OUT = stripes(256, seed=1)


@pytest.fixture(scope="module")
def teachers() -> dict[str, nn.Module]:
    """Small CNN and MLP teachers trained to 100 % on the stripes."""
    models = {
        "cnn": _seeded(FashionCNN, 0, channels=(8, 16), hidden_units=32),
        "mlp": _seeded(FashionMLP, 0, hidden_units=(64, 32)),
    }
    for model in models.values():
        train(
            model, *TRAIN, TrainConfig(local_epochs=2), generator=torch.Generator().manual_seed(0)
        )
        model.eval()
    return models


# --- pruning ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [_seeded(FashionCNN, 1), _seeded(FashionMLP, 1, hidden_units=(96, 48, 24))],
    ids=["cnn", "mlp"],
)
def test_keeping_everything_gives_an_identical_independent_copy(model: nn.Module) -> None:
    pruned = prune_structured(model, keep_fraction=1.0)

    assert type(pruned) is type(model) and pruned is not model
    assert torch.equal(pruned(_batch()), model(_batch()))
    with torch.no_grad():
        next(pruned.parameters()).add_(1.0)
    assert not torch.equal(pruned(_batch()), model(_batch()))


def test_pruning_the_cnn_removes_channels_and_units_by_the_fraction() -> None:
    model = _seeded(FashionCNN, 2)

    pruned = prune_structured(model, keep_fraction=0.5)

    assert isinstance(pruned, FashionCNN)
    assert pruned.features[0].out_channels == 8 and pruned.features[4].out_channels == 16
    assert pruned.features[1].num_groups == 4 and pruned.features[5].num_groups == 8
    assert pruned.head[1].out_features == 32
    expected = (8 * 25 + 8) + 2 * 8 + (16 * 8 * 25 + 16) + 2 * 16 + (16 * 49 * 32 + 32) + 330
    assert _parameters(pruned) == expected
    assert _parameters(model) / _parameters(pruned) == pytest.approx(3.96, abs=0.01)
    assert pruned(_batch()).shape == (8, 10)


def test_pruning_the_mlp_removes_hidden_units_but_keeps_the_classes() -> None:
    model = _seeded(FashionMLP, 3, hidden_units=(64, 32, 16))

    pruned = prune_structured(model, keep_fraction=0.25)

    assert isinstance(pruned, FashionMLP)
    widths = [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert widths == [16, 8, 4, 10]
    assert _parameters(pruned) == 784 * 16 + 16 + 16 * 8 + 8 + 8 * 4 + 4 + 4 * 10 + 10


def test_rounding_keeps_at_least_one_unit_per_layer_and_group() -> None:
    pruned = prune_structured(_seeded(FashionCNN, 4), keep_fraction=0.01)

    assert isinstance(pruned, FashionCNN)
    assert pruned.features[0].out_channels == 4  # one channel in each of 4 groups
    assert pruned.features[4].out_channels == 8
    assert pruned.head[1].out_features == 1


def test_pruning_shrinks_the_exported_onnx_file_by_the_removed_weights(tmp_path: Path) -> None:
    model = _seeded(FashionCNN, 5)
    pruned = prune_structured(model, keep_fraction=0.5)

    full = export_onnx(model, tmp_path / "full.onnx", example=_batch())
    small = export_onnx(pruned, tmp_path / "small.onnx", example=_batch())

    removed_bytes = 4 * (_parameters(model) - _parameters(pruned))
    assert full.size_bytes - small.size_bytes == pytest.approx(removed_bytes, rel=0.01)
    assert small.size_bytes < 0.32 * full.size_bytes  # measured 0.298: graph overhead stays
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(small.path)).graph.initializer if i.dims}
    assert (16, 8, 5, 5) in shapes.values() and (32, 16 * 49) in shapes.values()


def test_dropped_conv_channels_are_the_lowest_l1_of_each_group() -> None:
    model = _seeded(FashionCNN, 6)
    scales = torch.linspace(0.1, 3.2, 32)[
        torch.randperm(32, generator=torch.Generator().manual_seed(0))
    ]
    with torch.no_grad():
        model.get_parameter("features.4.weight").mul_(
            scales[:, None, None, None]
            / model.get_parameter("features.4.weight").abs().sum((1, 2, 3), keepdim=True)
        )

    pruned = prune_structured(model, keep_fraction={"features.4": 0.5})

    norms = scales.view(8, 4)  # 8 groups of 4 channels
    kept = (
        norms.argsort(dim=1, descending=True)[:, :2].sort(dim=1).values
        + 4 * torch.arange(8)[:, None]
    ).reshape(-1)
    original, smaller = model.state_dict(), pruned.state_dict()
    assert torch.equal(smaller["features.0.weight"], original["features.0.weight"])  # unmapped
    assert torch.equal(smaller["features.4.weight"], original["features.4.weight"][kept])
    assert torch.equal(smaller["features.5.weight"], original["features.5.weight"][kept])
    by_channel = original["head.1.weight"].view(64, 32, 49)[:, kept].reshape(64, -1)
    assert torch.equal(smaller["head.1.weight"], by_channel)


def test_dropped_neurons_are_the_lowest_l1_and_silent_ones_change_nothing() -> None:
    model = _seeded(FashionMLP, 7, hidden_units=(40, 20))
    silent = torch.arange(0, 40, 4)  # 10 of 40 first-layer neurons: tiny weights, negative bias
    first_weight, first_bias = (
        model.get_parameter("layers.1.weight"),
        model.get_parameter("layers.1.bias"),
    )
    with torch.no_grad():
        first_weight[silent] *= 1e-9
        first_bias[silent] = -1.0  # ReLU(-1 + ~0) = 0: these neurons never fire

    pruned = prune_structured(model, keep_fraction={"layers.1": 0.75})

    kept = torch.tensor([i for i in range(40) if i not in silent.tolist()])
    original, smaller = model.state_dict(), pruned.state_dict()
    assert torch.equal(smaller["layers.1.weight"], original["layers.1.weight"][kept])
    assert torch.equal(smaller["layers.3.weight"], original["layers.3.weight"][:, kept])
    torch.testing.assert_close(pruned(_batch()), model(_batch()), rtol=0, atol=1e-6)


def test_pruning_keeps_the_training_mode_and_leaves_the_original_alone() -> None:
    model = _seeded(FashionMLP, 8, hidden_units=(32,)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    pruned = prune_structured(model, keep_fraction=0.5)

    assert pruned.training
    assert not prune_structured(model.eval(), keep_fraction=0.5).training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prunable_layers_name_the_mapping_keys() -> None:
    assert prunable_layers(FashionCNN()) == ("features.0", "features.4", "head.1")
    assert prunable_layers(FashionMLP(hidden_units=(8, 4))) == ("layers.1", "layers.3")


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, math.nan, True])
def test_a_fraction_outside_the_unit_interval_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"^keep_fraction must be in \(0, 1\], got "):
        prune_structured(FashionCNN(), keep_fraction=fraction)


def test_a_mapping_fraction_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"keep_fraction\['head.1'\] must be in \(0, 1\], got 2"):
        prune_structured(FashionCNN(), keep_fraction={"head.1": 2})


def test_a_mapping_naming_an_unprunable_layer_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"keep_fraction names \['head.3'\], which FashionCNN cannot prune; "
        r"prunable layers: \['features.0', 'features.4', 'head.1'\]",
    ):
        prune_structured(FashionCNN(), keep_fraction={"head.3": 0.5})


class _WiderCNN(FashionCNN):
    """A subclass may change the architecture, so it is not pruned as a FashionCNN."""


@pytest.mark.parametrize("model", [nn.Linear(4, 2), _WiderCNN()], ids=["linear", "subclass"])
def test_unsupported_model_types_are_refused(model: nn.Module) -> None:
    with pytest.raises(
        ConfigError, match=r"cannot prune a \w+; supported: \['FashionCNN', 'FashionMLP'\]"
    ):
        prune_structured(model, keep_fraction=0.5)
    with pytest.raises(ConfigError, match="cannot prune"):
        prunable_layers(model)


# --- distillation -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_distillation_restores_an_aggressively_pruned_student(
    teachers: dict[str, nn.Module], kind: str
) -> None:
    teacher = teachers[kind]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_structured(teacher, keep_fraction=0.25)
    pruned_only = _agreement(student, teacher, HELD_OUT[0])

    report = distill(
        teacher,
        student,
        *TRAIN,
        config=DistillConfig(epochs=2),
        generator=torch.Generator().manual_seed(0),
    )

    distilled = _agreement(report.student, teacher, HELD_OUT[0])
    assert report.student is student and report.num_examples == 512
    assert len(report.epoch_losses) == 2 and report.epoch_losses[1] < report.epoch_losses[0]
    assert distilled >= 0.95  # measured 1.0 (cnn and mlp)
    assert distilled > pruned_only + 0.2  # pruned only: measured 0.73 (cnn), 0.28 (mlp)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_the_soft_term_alone_transfers_the_teacher_and_labels_alone_do_not(
    teachers: dict[str, nn.Module],
) -> None:
    teacher = teachers["mlp"]
    shuffled = np.random.default_rng(5).permutation(TRAIN[1])  # labels carry no signal

    def agreement_after(alpha: float) -> float:
        student = _seeded(FashionMLP, 1, hidden_units=(16,))
        config = DistillConfig(epochs=3, alpha=alpha, learning_rate=0.05)
        distill(
            teacher,
            student,
            TRAIN[0],
            shuffled,
            config=config,
            generator=torch.Generator().manual_seed(0),
        )
        return _agreement(student, teacher, HELD_OUT[0])

    assert agreement_after(1.0) > 0.7  # measured 0.86
    assert agreement_after(0.0) < 0.3  # measured 0.0


def test_adam_also_distils(teachers: dict[str, nn.Module]) -> None:
    teacher = teachers["mlp"]
    student = prune_structured(teacher, keep_fraction=0.25)
    pruned_only = _agreement(student, teacher, HELD_OUT[0])

    distill(
        teacher,
        student,
        *TRAIN,
        config=DistillConfig(epochs=2, optimiser=Optimiser.ADAM, learning_rate=0.003),
        generator=torch.Generator().manual_seed(0),
    )

    assert _agreement(student, teacher, HELD_OUT[0]) > pruned_only + 0.3  # 0.28 -> 0.77


def test_distillation_is_reproducible_under_a_seeded_generator(
    teachers: dict[str, nn.Module],
) -> None:
    def run() -> dict[str, torch.Tensor]:
        student = prune_structured(teachers["cnn"], keep_fraction=0.5)
        config = DistillConfig(epochs=1, batch_size=128)
        distill(
            teachers["cnn"],
            student,
            *TRAIN,
            config=config,
            generator=torch.Generator().manual_seed(3),
        )
        return student.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_compress_prunes_then_distils(teachers: dict[str, nn.Module]) -> None:
    teacher = teachers["mlp"]

    student = compress(
        teacher,
        TRAIN,
        keep_fraction=0.25,
        distill_config=DistillConfig(epochs=2),
        generator=torch.Generator().manual_seed(0),
    )

    assert isinstance(student, FashionMLP)
    assert _parameters(student) < 0.3 * _parameters(teacher)
    assert _agreement(student, teacher, HELD_OUT[0]) >= 0.95
    assert next(student.parameters()).device == torch.device("cpu")


def test_distillation_refuses_a_bad_transfer_set(teachers: dict[str, nn.Module]) -> None:
    teacher = teachers["mlp"]
    student = FashionMLP(hidden_units=(4,))
    generator = torch.Generator().manual_seed(0)
    images, labels = TRAIN

    with pytest.raises(ConfigError, match="cannot distil on an empty transfer set"):
        distill(
            teacher, student, images[:0], labels[:0], config=DistillConfig(), generator=generator
        )
    with pytest.raises(ConfigError, match="512 images but 511 labels"):
        distill(teacher, student, images, labels[:-1], config=DistillConfig(), generator=generator)
    with pytest.raises(ConfigError, match="the teacher gives 10 logits but the student 5"):
        distill(
            teacher,
            FashionMLP(5, hidden_units=(4,)),
            images,
            labels,
            config=DistillConfig(),
            generator=generator,
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, r"epochs must be >= 1, got 0"),
        ("batch_size", 0, r"batch_size must be >= 1, got 0"),
        ("learning_rate", 0.0, r"learning_rate must be a finite number > 0, got 0.0"),
        ("learning_rate", math.inf, r"learning_rate must be a finite number > 0, got inf"),
        ("momentum", 1.0, r"momentum must be in \[0, 1\), got 1.0"),
        ("optimiser", "sgd", r"optimiser must be one of \['sgd', 'adam'\], got 'sgd'"),
        ("temperature", 0.0, r"temperature must be a finite number > 0, got 0.0"),
        ("temperature", math.nan, r"temperature must be a finite number > 0, got nan"),
        ("alpha", 1.5, r"alpha must be in \[0, 1\], got 1.5"),
        ("alpha", -0.1, r"alpha must be in \[0, 1\], got -0.1"),
    ],
)
def test_distill_config_validates_every_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**{field: value})  # type: ignore[arg-type]
