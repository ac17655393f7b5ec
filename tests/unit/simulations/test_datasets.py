from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.errors import ConfigError, DataError
from simulations.data import Split
from simulations.datasets import (
    BUILTIN_DATASETS,
    FASHION_MNIST_CLASSES,
    Dataset,
    InputEncoding,
    cached_dataset,
    load_dataset,
    resolve_loader,
)
from tests.unit.simulations.test_shuttle import CLASSES, shuttle_frame, write_shuttle

LOADER_PATH = "tests.unit.simulations.test_datasets:toy_loader"
loader_calls: list[Path | None] = []


def toy_split(count: int, *, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, 3)).astype(np.float32)
    return Split(images=features, labels=(features[:, 0] > 0).astype(np.uint8))


def toy_dataset(**changes: Any) -> Dataset:
    fields: dict[str, Any] = {
        "name": "toy",
        "train": toy_split(20, seed=0),
        "test": toy_split(5, seed=1),
        "num_classes": 2,
        "encoding": InputEncoding.FLOAT32,
        "feature_shape": (3,),
        "class_names": ("low", "high"),
    }
    fields.update(changes)
    return Dataset(**fields)


def toy_loader(data_dir: Path | None) -> Dataset:
    """A user's loader, named by import path in the tests."""
    loader_calls.append(data_dir)
    return toy_dataset()


def not_a_loader(data_dir: Path | None) -> object:
    return {"train": []}


NOT_CALLABLE = 3


def image_dataset(**changes: Any) -> Dataset:
    images = np.zeros((4, 5, 6), dtype=np.uint8)
    fields: dict[str, Any] = {
        "name": "images",
        "train": Split(images=images, labels=np.array([0, 1, 0, 1], dtype=np.uint8)),
        "test": Split(images=images[:2], labels=np.array([1, 0], dtype=np.uint8)),
        "num_classes": 2,
        "encoding": InputEncoding.UINT8_IMAGES,
        "feature_shape": (5, 6),
        "class_names": ("a", "b"),
    }
    fields.update(changes)
    return Dataset(**fields)


# ---- Dataset validation -------------------------------------------------------------


def test_a_valid_dataset_keeps_its_fields() -> None:
    dataset = toy_dataset()

    assert dataset.train.features is dataset.train.images
    assert dataset.feature_shape == (3,)
    assert len(dataset.train) == 20
    assert dataclasses.is_dataclass(dataset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dataset.name = "other"  # type: ignore[misc]


def test_an_empty_test_split_is_allowed() -> None:
    empty = Split(images=np.zeros((0, 3), np.float32), labels=np.zeros(0, np.uint8))

    assert len(toy_dataset(test=empty).test) == 0


def test_uint8_images_are_accepted() -> None:
    assert image_dataset().encoding is InputEncoding.UINT8_IMAGES


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, r"a data set's name must be a non-empty string, got ''"),
        ({"encoding": "float32"}, r"data set toy: unknown input encoding 'float32'"),
        ({"num_classes": True}, r"num_classes must be an int, got True"),
        ({"num_classes": 2.0}, r"num_classes must be an int, got 2\.0"),
        ({"num_classes": 1, "class_names": ("x",)}, r"num_classes must be >= 2, got 1"),
        ({"feature_shape": ()}, r"feature_shape must be a non-empty tuple of positive ints"),
        ({"feature_shape": [3]}, r"feature_shape must be a non-empty tuple .*got \[3\]"),
        ({"feature_shape": (3, 0)}, r"feature_shape must be .*positive ints, got \(3, 0\)"),
        ({"feature_shape": (True,)}, r"feature_shape must be .*positive ints"),
        ({"class_names": ["low", "high"]}, r"class_names must be a tuple of non-empty strings"),
        ({"class_names": ("low", "")}, r"class_names must be a tuple of non-empty strings"),
        ({"class_names": ("low",)}, r"1 class names for 2 classes"),
        ({"class_names": ("low", "low")}, r"class names repeat: \('low', 'low'\)"),
        ({"train": (np.zeros((2, 3)), np.zeros(2))}, r"train split: expected a .*Split, got tuple"),
    ],
)
def test_invalid_fields_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        toy_dataset(**changes)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        ([[0.0, 0.0, 0.0]], np.zeros(1, np.int64), r"inputs and labels must be numpy arrays"),
        (
            np.zeros((2, 3), np.float32),
            np.zeros((2, 1), np.int64),
            r"labels must have shape \(N,\)",
        ),
        (np.zeros((2, 3), np.float32), np.zeros(3, np.int64), r"2 examples but 3 labels"),
        (
            np.zeros((2, 4), np.float32),
            np.zeros(2, np.int64),
            r"examples of shape \(4,\), expected",
        ),
        (
            np.zeros((2, 3), np.float64),
            np.zeros(2, np.int64),
            r"float32 inputs must be float32, got float64",
        ),
        (np.zeros(2, np.int64), np.zeros(2, np.int64), r"examples of shape \(\), expected \(3,\)"),
        (np.zeros((2, 3), np.float32), np.zeros(2, np.float32), r"labels must be integers, got"),
        (np.zeros((2, 3), np.float32), np.array([0, 2]), r"labels span 0\.\.2, expected 0\.\.1"),
        (np.zeros((2, 3), np.float32), np.array([-1, 0]), r"labels span -1\.\.0, expected 0\.\.1"),
    ],
)
def test_invalid_splits_are_refused(images: Any, labels: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"data set toy, test split: {message}"):
        toy_dataset(test=Split(images=images, labels=labels))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(bad: float) -> None:
    features = np.zeros((2, 3), np.float32)
    features[1, 2] = bad

    with pytest.raises(ConfigError, match=r"train split: features hold NaN or infinite values"):
        toy_dataset(train=Split(images=features, labels=np.zeros(2, np.uint8)))


def test_an_empty_train_split_is_refused() -> None:
    empty = Split(images=np.zeros((0, 3), np.float32), labels=np.zeros(0, np.uint8))

    with pytest.raises(ConfigError, match=r"data set toy: the train split is empty"):
        toy_dataset(train=empty)


def test_uint8_images_must_be_uint8() -> None:
    split = Split(images=np.zeros((2, 5, 6), np.float32), labels=np.zeros(2, np.uint8))

    with pytest.raises(ConfigError, match=r"uint8-images inputs must be uint8, got float32"):
        image_dataset(test=split)


def test_uint8_images_are_two_dimensional() -> None:
    with pytest.raises(ConfigError, match=r"uint8 images have feature_shape \(H, W\), got \(30,\)"):
        image_dataset(feature_shape=(30,))


# ---- resolving and loading ----------------------------------------------------------


def test_builtins_are_fashion_mnist_and_shuttle() -> None:
    assert sorted(BUILTIN_DATASETS) == ["fashion-mnist", "shuttle"]
    assert resolve_loader("shuttle") is BUILTIN_DATASETS["shuttle"]
    with pytest.raises(TypeError):
        BUILTIN_DATASETS["mine"] = toy_loader  # type: ignore[index]


def test_an_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown data set 'mnist': use a built-in \(fashion-mnist, shuttle\) "
        r"or an import path 'package\.module:loader'",
    ):
        resolve_loader("mnist")


def test_a_name_must_be_a_string() -> None:
    with pytest.raises(ConfigError, match=r"a data set is named by a string, got int"):
        resolve_loader(3)  # type: ignore[arg-type]


def test_a_missing_module_is_named() -> None:
    with pytest.raises(
        ConfigError,
        match=r"data set 'no_such_pkg\.data:load': cannot import its module 'no_such_pkg\.data'",
    ):
        resolve_loader("no_such_pkg.data:load")


@pytest.mark.parametrize("attribute", ["missing", "NOT_CALLABLE"])
def test_a_missing_or_non_callable_attribute_is_named(attribute: str) -> None:
    name = f"tests.unit.simulations.test_datasets:{attribute}"

    with pytest.raises(
        ConfigError, match=rf"tests\.unit\.simulations\.test_datasets has no callable '{attribute}'"
    ):
        resolve_loader(name)


def test_a_loader_given_by_import_path_is_called_with_the_directory(tmp_path: Path) -> None:
    loader_calls.clear()

    dataset = load_dataset(LOADER_PATH, str(tmp_path))
    load_dataset(LOADER_PATH, "")
    load_dataset(LOADER_PATH)

    assert dataset.name == "toy"
    assert loader_calls == [tmp_path, None, None]


def test_a_loader_returning_something_else_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"the loader returned dict, not a simulations\.datasets\.Dataset",
    ):
        load_dataset("tests.unit.simulations.test_datasets:not_a_loader")


def test_fashion_mnist_builtin_has_its_class_names(fashion_dir: Path) -> None:
    dataset = load_dataset("fashion-mnist", fashion_dir)

    assert dataset.name == "fashion-mnist"
    assert dataset.encoding is InputEncoding.UINT8_IMAGES
    assert dataset.feature_shape == (28, 28)
    assert dataset.num_classes == 10
    assert dataset.class_names == FASHION_MNIST_CLASSES
    assert len(dataset.train) == 200
    assert len(dataset.test) == 50


def test_shuttle_builtin_is_float_features(tmp_path: Path) -> None:
    dataset = load_dataset("shuttle", write_shuttle(tmp_path, shuttle_frame()))

    assert dataset.name == "shuttle"
    assert dataset.encoding is InputEncoding.FLOAT32
    assert dataset.feature_shape == (9,)
    assert dataset.num_classes == 7
    assert dataset.class_names == CLASSES


def test_a_builtin_without_its_files_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"apt-get install r-cran-mlbench"):
        load_dataset("shuttle", tmp_path / "nowhere")


def test_cached_dataset_loads_once_per_arguments_and_freezes_the_arrays(tmp_path: Path) -> None:
    loader_calls.clear()
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"

    first = cached_dataset(LOADER_PATH, first_dir)
    again = cached_dataset(LOADER_PATH, str(first_dir))
    other = cached_dataset(LOADER_PATH, second_dir)

    assert first is again
    assert other is not first
    assert loader_calls == [first_dir, second_dir]
    assert not first.train.images.flags.writeable
    assert not first.test.labels.flags.writeable


def test_loaders_pickle_by_reference() -> None:
    for name in BUILTIN_DATASETS:
        assert pickle.loads(pickle.dumps(resolve_loader(name))) is resolve_loader(name)
    assert pickle.loads(pickle.dumps(resolve_loader(LOADER_PATH))) is toy_loader


def test_any_integer_label_dtype_passes_validation() -> None:
    # Split's annotation says uint8 (the built-ins); a user's loader may hand int64.
    labels: Any = np.array([0, 1, 1], dtype=np.int64)

    split = Split(images=np.zeros((3, 3), np.float32), labels=labels)

    assert toy_dataset(test=split).test.labels.dtype == np.int64
