from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime.models import FashionCNN, ModelName, build_model
from fedge.errors import ConfigError
from fl_client.training import TrainConfig, evaluate, images_to_tensor, train
from tests.helpers import stripes


def test_model_maps_images_to_ten_logits() -> None:
    model = build_model(ModelName.CNN, seed=0)

    logits = model(torch.zeros(4, 1, 28, 28))

    assert isinstance(model, FashionCNN)
    assert logits.shape == (4, 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_seeded_models_are_identical_and_unseeded_ones_differ() -> None:
    first = build_model(ModelName.CNN, seed=7).state_dict()
    again = build_model(ModelName.CNN, seed=7).state_dict()
    other = build_model(ModelName.CNN, seed=8).state_dict()

    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["head.3.weight"], other["head.3.weight"])


def test_unknown_model_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown model 'mlp'"):
        build_model("mlp")  # type: ignore[arg-type]


def test_training_learns_a_separable_task() -> None:
    images, labels = stripes(400, seed=0)
    test_images, test_labels = stripes(200, seed=1)
    model = build_model(ModelName.CNN, seed=0)
    before = evaluate(model, test_images, test_labels)

    result = train(
        model,
        images,
        labels,
        TrainConfig(local_epochs=2, batch_size=32, learning_rate=0.05),
        generator=torch.Generator().manual_seed(0),
    )
    after = evaluate(model, test_images, test_labels)

    assert result.num_examples == 400
    assert after.accuracy > 0.9
    assert after.accuracy > before.accuracy + 0.5
    assert after.loss < before.loss


def test_training_is_reproducible_under_a_seeded_generator() -> None:
    images, labels = stripes(64, seed=2)

    def run() -> dict[str, torch.Tensor]:
        model = build_model(ModelName.CNN, seed=3)
        train(model, images, labels, TrainConfig(), generator=torch.Generator().manual_seed(9))
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_images_are_scaled_to_unit_range_with_a_channel_axis() -> None:
    tensor = images_to_tensor(np.full((2, 28, 28), 255, dtype=np.uint8))

    assert tensor.shape == (2, 1, 28, 28)
    assert tensor.dtype == torch.float32
    assert float(tensor.max()) == pytest.approx(1.0)


def test_empty_or_mismatched_data_is_refused() -> None:
    model = build_model(ModelName.CNN)
    generator = torch.Generator()
    images, labels = stripes(8, seed=0)

    with pytest.raises(ConfigError, match="empty partition"):
        train(model, images[:0], labels[:0], TrainConfig(), generator=generator)
    with pytest.raises(ConfigError, match="8 images but 7 labels"):
        train(model, images, labels[:7], TrainConfig(), generator=generator)
    with pytest.raises(ConfigError, match="empty set"):
        evaluate(model, images[:0], labels[:0])
    with pytest.raises(ConfigError, match=r"shape \(N, H, W\)"):
        images_to_tensor(images[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_epochs": 0}, "local_epochs must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number > 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
    ],
)
def test_train_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_fedprox_keeps_the_local_model_closer_to_the_global_one() -> None:
    images, labels = stripes(200, seed=0)
    start = build_model(ModelName.CNN, seed=0)
    anchor = torch.cat([p.detach().reshape(-1) for p in start.parameters()])

    def drift(mu: float) -> float:
        model = build_model(ModelName.CNN, seed=0)
        config = TrainConfig(local_epochs=2, batch_size=20, learning_rate=0.1, proximal_mu=mu)
        train(model, images, labels, config, generator=torch.Generator().manual_seed(0))
        return float(
            torch.cat([p.detach().reshape(-1) for p in model.parameters()]).sub(anchor).norm()
        )

    assert drift(5.0) < 0.7 * drift(0.0)


def test_proximal_mu_is_validated() -> None:
    with pytest.raises(ConfigError, match="proximal_mu must be in"):
        TrainConfig(proximal_mu=-0.1)
