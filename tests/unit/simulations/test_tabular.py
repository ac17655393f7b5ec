from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from edge_runtime.model_spec import InputEncoding, ModelSpec
from fedge.errors import ConfigError
from simulations.tabular import SensorMLP


def test_defaults_fit_shuttle() -> None:
    model = SensorMLP()

    logits = model(torch.zeros(5, 9))

    assert logits.shape == (5, 7)
    assert model.hidden_units == (64, 64)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(9, 64), (64, 64), (64, 7)]


def test_keyword_arguments_only_build_it() -> None:
    model = SensorMLP(in_features=4, num_classes=3, hidden_units=(8,))

    assert model(torch.zeros(2, 4)).shape == (2, 3)


def test_no_hidden_layer_is_a_linear_model() -> None:
    model = SensorMLP(in_features=4, num_classes=2, hidden_units=())

    assert [type(m) for m in model.layers] == [nn.Flatten, nn.Linear]


def test_a_list_of_widths_is_accepted() -> None:
    assert SensorMLP(hidden_units=[16, 8]).hidden_units == (16, 8)


def test_has_no_batch_norm() -> None:
    kinds = {type(m) for m in SensorMLP().modules()}

    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)


def test_model_spec_builds_it_by_import_path() -> None:
    spec = ModelSpec(
        import_path="simulations.tabular:SensorMLP",
        kwargs=(("hidden_units", (32, 16)), ("num_classes", 7)),
        encoding=InputEncoding.FLOAT32,
    )

    first, second = spec.build(seed=3), spec.build(seed=3)

    assert isinstance(first, SensorMLP)
    assert first.hidden_units == (32, 16)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 0}, r"in_features must be a positive int, got 0"),
        ({"in_features": 9.0}, r"in_features must be a positive int, got 9\.0"),
        ({"in_features": True}, r"in_features must be a positive int, got True"),
        ({"num_classes": 0}, r"num_classes must be a positive int, got 0"),
        ({"num_classes": 1}, r"num_classes must be >= 2, got 1"),
        ({"hidden_units": 64}, r"hidden_units must be a sequence of ints, got 64"),
        ({"hidden_units": "64"}, r"hidden_units must be a sequence of ints, got '64'"),
        ({"hidden_units": (64, 0)}, r"every hidden_units entry must be a positive int, got 0"),
        ({"hidden_units": (64, 2.5)}, r"every hidden_units entry must be a positive int, got 2\.5"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SensorMLP(**kwargs)


def test_trains_on_a_separable_toy_problem() -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    features = torch.randn(256, 9, generator=generator)
    # Three classes separated by the sign pattern of two features.
    labels = (features[:, 0] > 0).long() + (features[:, 3] > 0.5).long()
    model = SensorMLP(num_classes=3, hidden_units=(16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()

    with torch.no_grad():
        initial = float(loss_fn(model(features), labels))
    for _ in range(100):
        optimizer.zero_grad()
        loss = loss_fn(model(features), labels)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(features)
        final = float(loss_fn(logits, labels))
        accuracy = float((logits.argmax(dim=1) == labels).float().mean())

    assert final < initial / 3
    assert accuracy > 0.9


def test_opacus_accepts_it_for_dp_sgd() -> None:
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(SensorMLP(), strict=False) == []
