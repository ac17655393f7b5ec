from __future__ import annotations

import lzma
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pytest
import rdata

from fedge.errors import DataError
from simulations.partition import PartitionConfig, PartitionMode, partition
from simulations.shuttle import (
    DEFAULT_SHUTTLE_DIR,
    FEATURE_NAMES,
    SHUTTLE_DIR_ENV,
    SHUTTLE_FILE,
    load_shuttle,
    resolve_shuttle_dir,
)

CLASSES = ("Rad.Flow", "Fpv.Close", "Fpv.Open", "High", "Bypass", "Bpv.Close", "Bpv.Open")
# Shuttle's training-split class counts (UCI shuttle.trn).
TRAIN_COUNTS = (34108, 37, 132, 6748, 2458, 6, 11)


def shuttle_frame(rows: int = 40, *, seed: int = 0) -> Any:
    """A data frame shaped like mlbench's Shuttle: V1..V9 numeric, the factor Class."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {name: rng.integers(-50, 150, size=rows).astype(np.float64) for name in FEATURE_NAMES}
    )
    frame["Class"] = pd.Categorical(
        [CLASSES[i % len(CLASSES)] for i in range(rows)], categories=list(CLASSES)
    )
    return frame


def write_shuttle(directory: Path, frame: Any, *, name: str = "Shuttle") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rdata.write_rda(directory / SHUTTLE_FILE, {name: frame}, compression="xz")
    return directory


@pytest.fixture
def shuttle_dir(tmp_path: Path) -> Path:
    return write_shuttle(tmp_path / "shuttle", shuttle_frame())


def test_loads_the_last_quarter_as_test_split(shuttle_dir: Path) -> None:
    data = load_shuttle(shuttle_dir)

    assert data.train.images.shape == (30, 9)
    assert data.test.images.shape == (10, 9)
    assert data.train.images.dtype == np.float32
    assert data.train.labels.dtype == np.uint8
    assert data.class_names == CLASSES
    expected = [i % 7 for i in range(40)]
    np.testing.assert_array_equal(np.concatenate([data.train.labels, data.test.labels]), expected)


def test_standardises_with_the_train_split_statistics_only(tmp_path: Path) -> None:
    frame = shuttle_frame(rows=40)
    frame.loc[30:, "V1"] = 1e6  # an outlier in the test rows must not move the statistics
    raw = frame[list(FEATURE_NAMES)].to_numpy()

    data = load_shuttle(write_shuttle(tmp_path, frame))

    np.testing.assert_allclose(data.mean, raw[:30].mean(axis=0))
    np.testing.assert_allclose(data.std, raw[:30].std(axis=0))
    np.testing.assert_allclose(data.train.images.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.train.images.std(axis=0), 1.0, atol=1e-5)
    expected_test = (raw[30:] - raw[:30].mean(axis=0)) / raw[:30].std(axis=0)
    np.testing.assert_allclose(data.test.images, expected_test.astype(np.float32), rtol=1e-6)


def test_a_constant_column_is_centred_not_divided_by_zero(tmp_path: Path) -> None:
    frame = shuttle_frame()
    frame["V4"] = 0.0

    data = load_shuttle(write_shuttle(tmp_path, frame))

    assert data.std[3] == 1.0
    assert np.all(data.train.images[:, 3] == 0.0)


def test_integer_columns_are_read_as_numbers(tmp_path: Path) -> None:
    frame = shuttle_frame()
    frame["V2"] = frame["V2"].astype(np.int32)

    data = load_shuttle(write_shuttle(tmp_path, frame))

    assert np.isfinite(data.train.images).all()


def test_is_deterministic_and_read_only(shuttle_dir: Path) -> None:
    first, second = load_shuttle(shuttle_dir), load_shuttle(shuttle_dir)

    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    assert not first.train.images.flags.writeable
    assert not first.test.labels.flags.writeable


def test_directory_comes_from_the_argument_the_environment_or_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SHUTTLE_DIR_ENV, raising=False)
    assert resolve_shuttle_dir() == DEFAULT_SHUTTLE_DIR
    assert resolve_shuttle_dir("") == DEFAULT_SHUTTLE_DIR
    monkeypatch.setenv(SHUTTLE_DIR_ENV, str(tmp_path / "env"))
    assert resolve_shuttle_dir() == tmp_path / "env"
    assert resolve_shuttle_dir(tmp_path / "arg") == tmp_path / "arg"


def test_environment_variable_is_used_by_the_loader(
    shuttle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHUTTLE_DIR_ENV, str(shuttle_dir))

    assert len(load_shuttle().train) == 30


def test_missing_directory_says_how_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"does not exist\. Get it with `sudo apt-get install r-cran-mlbench`.*"
        r"Shuttle\.rda.*mlbench.*FEDGE_SHUTTLE_DIR=DIR",
    ):
        load_shuttle(tmp_path / "nowhere")


def test_missing_file_says_how_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"Shuttle\.rda not found in .*apt-get install r-cran-mlbench"
    ):
        load_shuttle(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"RDX3\ngarbage", b"\x00" * 64, lzma.compress(b"RDX3\nX\n\x00\x00\x00\x03")],
    ids=["empty", "garbage", "zeros", "truncated-xz"],
)
def test_a_corrupt_file_is_a_data_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / SHUTTLE_FILE).write_bytes(content)

    with pytest.raises(DataError, match=r"cannot read .*Shuttle\.rda: .*corrupt.*r-cran-mlbench"):
        load_shuttle(tmp_path)


def test_a_truncated_real_format_file_is_a_data_error(shuttle_dir: Path) -> None:
    path = shuttle_dir / SHUTTLE_FILE
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(DataError, match=r"cannot read .*corrupt"):
        load_shuttle(shuttle_dir)


def test_a_file_without_the_shuttle_frame_is_refused(tmp_path: Path) -> None:
    write_shuttle(tmp_path, shuttle_frame(), name="Satellite")

    with pytest.raises(DataError, match=r"no data frame named 'Shuttle' \(found: Satellite\)"):
        load_shuttle(tmp_path)


def test_a_shuttle_object_that_is_not_a_frame_is_refused(tmp_path: Path) -> None:
    rdata.write_rda(tmp_path / SHUTTLE_FILE, {"Shuttle": [1.0, 2.0]})

    with pytest.raises(DataError, match=r"no data frame named 'Shuttle'"):
        load_shuttle(tmp_path)


def test_wrong_columns_are_named(tmp_path: Path) -> None:
    frame = shuttle_frame().drop(columns=["V9"])

    with pytest.raises(
        DataError, match=r"has columns \['V1', .*'Class'\], expected .*'V9', 'Class'"
    ):
        load_shuttle(write_shuttle(tmp_path, frame))


def test_a_text_column_is_refused(tmp_path: Path) -> None:
    frame = shuttle_frame()
    frame["V3"] = ["x"] * len(frame)

    with pytest.raises(DataError, match=r"column V3 holds .*not numbers"):
        load_shuttle(write_shuttle(tmp_path, frame))


def test_a_factor_feature_column_is_refused(tmp_path: Path) -> None:
    frame = shuttle_frame()
    frame["V3"] = pd.Categorical(["a"] * len(frame))

    with pytest.raises(DataError, match=r"column V3 is not a numeric vector"):
        load_shuttle(write_shuttle(tmp_path, frame))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_missing_or_infinite_features_are_counted(tmp_path: Path, bad: float) -> None:
    frame = shuttle_frame()
    frame.loc[[3, 7], "V5"] = bad

    with pytest.raises(DataError, match=r"column V5 holds 2 missing or non-finite values"):
        load_shuttle(write_shuttle(tmp_path, frame))


def test_a_class_that_is_not_a_factor_is_refused(tmp_path: Path) -> None:
    frame = shuttle_frame()
    frame["Class"] = frame["Class"].astype(str)

    with pytest.raises(DataError, match=r"column Class is not a factor"):
        load_shuttle(write_shuttle(tmp_path, frame))


def test_missing_classes_are_counted(tmp_path: Path) -> None:
    frame = shuttle_frame()
    frame.loc[[0, 5, 9], "Class"] = np.nan

    with pytest.raises(DataError, match=r"3 rows have a missing or unknown Class"):
        load_shuttle(write_shuttle(tmp_path, frame))


def test_a_factor_of_one_level_is_refused(tmp_path: Path) -> None:
    frame = shuttle_frame()
    frame["Class"] = pd.Categorical(["Rad.Flow"] * len(frame))

    with pytest.raises(DataError, match=r"the Class factor has 1 levels"):
        load_shuttle(write_shuttle(tmp_path, frame))


def test_too_few_rows_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds 3 rows, fewer than 4"):
        load_shuttle(write_shuttle(tmp_path, shuttle_frame(rows=3)))


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        (PartitionMode.IID, {}),
        (PartitionMode.DIRICHLET, {"alpha": 0.5}),
        (PartitionMode.DIRICHLET, {"alpha": 0.05}),
        (PartitionMode.SHARDS, {"shards_per_client": 2}),
    ],
)
def test_every_partitioning_splits_shuttles_class_mix_across_20_clients(
    mode: PartitionMode, extra: dict[str, Any]
) -> None:
    labels = np.repeat(np.arange(7, dtype=np.uint8), TRAIN_COUNTS)

    parts = partition(labels, PartitionConfig(num_clients=20, mode=mode, seed=1, **extra))

    assert len(parts) == 20
    assert min(len(p) for p in parts) >= 1
    merged = np.concatenate(parts)
    assert len(merged) == len(labels)
    np.testing.assert_array_equal(np.sort(merged), np.arange(len(labels)))


REAL_FILE = DEFAULT_SHUTTLE_DIR / SHUTTLE_FILE


@pytest.mark.skipif(
    not REAL_FILE.is_file(),
    reason=f"{REAL_FILE} is absent (install it with: sudo apt-get install r-cran-mlbench)",
)
def test_the_real_debian_file_is_uci_shuttle() -> None:
    data = load_shuttle(DEFAULT_SHUTTLE_DIR)

    assert data.train.images.shape == (43_500, 9)
    assert data.test.images.shape == (14_500, 9)
    assert data.class_names == CLASSES
    np.testing.assert_array_equal(np.bincount(data.train.labels, minlength=7), TRAIN_COUNTS)
    np.testing.assert_array_equal(
        np.bincount(data.test.labels, minlength=7), (11478, 13, 39, 2155, 809, 4, 2)
    )
    # UCI's shuttle.tst starts with "55 0 81 0 -6 11 25 88 64 4" (class 4 = High).
    first_test = np.asarray(data.test.images[0], dtype=np.float64) * data.std + data.mean
    np.testing.assert_allclose(first_test, [55, 0, 81, 0, -6, 11, 25, 88, 64], atol=1e-3)
    assert data.class_names[int(data.test.labels[0])] == "High"
