"""The model registry: the 4M-parameter MLP and the width-configurable CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_runtime.models import FashionCNN, FashionMLP, ModelName, build_model
from fedge.errors import ConfigError

# The FashionCNN checkpoints already published hold exactly these tensors.
CNN_STATE = {
    "features.0.weight": (16, 1, 5, 5),
    "features.0.bias": (16,),
    "features.1.weight": (16,),
    "features.1.bias": (16,),
    "features.4.weight": (32, 16, 5, 5),
    "features.4.bias": (32,),
    "features.5.weight": (32,),
    "features.5.bias": (32,),
    "head.1.weight": (64, 1568),
    "head.1.bias": (64,),
    "head.3.weight": (10, 64),
    "head.3.bias": (10,),
}


def _parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_the_mlp_has_about_four_million_parameters_and_no_batch_norm() -> None:
    model = build_model(ModelName.MLP, seed=0)

    logits = model(torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)))

    assert isinstance(model, FashionMLP)
    assert logits.shape == (3, 10)
    # 784*2048+2048 + 2048*1024+1024 + 1024*256+256 + 256*10+10
    assert _parameters(model) == 3_970_826
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_the_mlp_normalises_pixels_like_the_cnn() -> None:
    model = FashionMLP(1, hidden_units=(1,))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.get_parameter("layers.1.weight")[0, 0] = 1.0  # the hidden unit reads pixel (0, 0)
        model.get_parameter("layers.3.weight")[0, 0] = 1.0  # the logit is the hidden unit
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 0, 0] = 1.0

    logit = model(image)

    cnn = FashionCNN()
    torch.testing.assert_close(logit, torch.full((1, 1), (1.0 - cnn.mean) / cnn.std))


def test_seeded_mlps_are_identical_and_widths_are_configurable() -> None:
    first = build_model(ModelName.MLP, seed=4).state_dict()
    again = build_model(ModelName.MLP, seed=4).state_dict()
    narrow = FashionMLP(5, hidden_units=(12, 6))

    assert all(torch.equal(first[k], again[k]) for k in first)
    assert [tuple(v.shape) for v in narrow.state_dict().values()] == [
        (12, 784),
        (12,),
        (6, 12),
        (6,),
        (5, 6),
        (5,),
    ]
    assert list(narrow.state_dict()) == [
        f"layers.{i}.{p}" for i in (1, 3, 5) for p in ("weight", "bias")
    ]


def test_the_default_cnn_keeps_its_published_state_dict() -> None:
    state = FashionCNN().state_dict()

    assert {k: tuple(v.shape) for k, v in state.items()} == CNN_STATE
    assert _parameters(FashionCNN()) == 114_410


def test_a_narrower_cnn_keeps_its_keys_and_group_counts() -> None:
    model = FashionCNN(channels=(8, 24), hidden_units=20)

    logits = model(torch.zeros(2, 1, 28, 28))

    assert logits.shape == (2, 10)
    assert list(model.state_dict()) == list(CNN_STATE)
    assert model.get_parameter("head.1.weight").shape == (20, 24 * 49)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [m.num_groups for m in norms] == [4, 8]


@pytest.mark.parametrize("channels", [(6, 32), (16, 12), (0, 32)])
def test_cnn_channels_must_be_multiples_of_the_group_counts(channels: tuple[int, int]) -> None:
    first, second = channels
    message = rf"channels must be positive multiples of \[4, 8\], got \[{first}, {second}\]"
    with pytest.raises(ConfigError, match=message):
        FashionCNN(channels=channels)


def test_cnn_hidden_units_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="hidden_units must be >= 1, got 0"):
        FashionCNN(hidden_units=0)


@pytest.mark.parametrize("widths", [(), (8, 0)])
def test_mlp_widths_must_be_positive_and_present(widths: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=r"hidden_units must be one or more widths >= 1, got \["):
        FashionMLP(hidden_units=widths)
