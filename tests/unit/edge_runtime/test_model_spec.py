"""ModelSpec: a model by built-in name or import path; to_tensor by encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edge_runtime.model_spec import InputEncoding, ModelSpec, to_tensor
from edge_runtime.models import FashionCNN, ModelName
from fedge.errors import ConfigError


class TinyNet(nn.Module):
    """A model defined outside fedge, named by import path in the tests."""

    def __init__(self, in_features: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(inputs)
        return out


def not_a_model() -> str:
    return "nope"


_PATH = "tests.unit.edge_runtime.test_model_spec"


def test_a_model_by_import_path_is_built_with_its_arguments_and_seed() -> None:
    spec = ModelSpec(
        import_path=f"{_PATH}:TinyNet",
        kwargs=(("in_features", 9), ("num_classes", 7)),
        encoding=InputEncoding.FLOAT32,
    )

    first, again, other = spec.build(seed=1), spec.build(seed=1), spec.build(seed=2)

    assert isinstance(first, TinyNet) and first.layer.in_features == 9
    weights = [m.state_dict()["layer.weight"] for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert spec.label == f"{_PATH}:TinyNet"
    assert spec.to_json()["kwargs"] == {"in_features": 9, "num_classes": 7}


def test_a_builtin_spec_builds_the_builtin_model() -> None:
    spec = ModelSpec.of(ModelName.CNN)

    assert isinstance(spec.build(seed=0), FashionCNN)
    assert spec.label == "cnn" and spec.encoding is InputEncoding.UINT8_IMAGES


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "either a built-in name or an import path"),
        ({"builtin": ModelName.CNN, "import_path": "a:b"}, "either a built-in name"),
        ({"import_path": "no_colon"}, "reads 'package.module:Factory'"),
        ({"import_path": "a.b:c", "kwargs": (("not ok", 1),)}, "must be identifiers"),
        ({"builtin": ModelName.CNN, "kwargs": (("x", 1),)}, "built-in models take no arguments"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (ModelSpec(import_path="no_such_module_xyz:Net"), "cannot import the model's module"),
        (ModelSpec(import_path=f"{_PATH}:Missing"), "has no callable 'Missing'"),
        (ModelSpec(import_path=f"{_PATH}:not_a_model"), "returned str, not a torch.nn.Module"),
        (ModelSpec(import_path=f"{_PATH}:TinyNet", kwargs=(("width", 3),)), "unexpected keyword"),
    ],
)
def test_a_model_that_cannot_be_built_says_why(spec: ModelSpec, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        spec.build()


def test_inputs_become_tensors_by_their_encoding() -> None:
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    features = np.arange(6, dtype=np.float64).reshape(2, 3)

    pixels = to_tensor(images, InputEncoding.UINT8_IMAGES)
    values = to_tensor(features, InputEncoding.FLOAT32)

    assert pixels.shape == (2, 1, 28, 28) and float(pixels.max()) == 1.0
    assert values.dtype == torch.float32 and values.tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ConfigError, match="must be uint8"):
        to_tensor(features.reshape(2, 3, 1), InputEncoding.UINT8_IMAGES)
    with pytest.raises(ConfigError, match=r"shape \(N, ...\)"):
        to_tensor(np.zeros(3), InputEncoding.FLOAT32)
