from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedge.errors import ConfigError, StorageError
from fl_server.checkpoints import CheckpointDir, load_weights, weights_to_npz

WEIGHTS = {
    "features.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "head.bias": np.ones(5, dtype=np.float32),
}


def test_save_writes_the_file_its_digest_names(tmp_path: Path) -> None:
    saved = CheckpointDir(tmp_path / "models").save(3, WEIGHTS)

    assert saved.path == tmp_path / "models" / "round-0003.npz"
    data = saved.path.read_bytes()
    assert saved.sha256 == hashlib.sha256(data).hexdigest()
    assert saved.size_bytes == len(data)
    assert [p.name for p in saved.path.parent.iterdir()] == ["round-0003.npz"]


def test_equal_weights_give_equal_bytes() -> None:
    copy = {name: array.copy() for name, array in WEIGHTS.items()}

    assert weights_to_npz(WEIGHTS) == weights_to_npz(copy)
    changed = dict(copy, **{"head.bias": np.zeros(5, dtype=np.float32)})
    assert weights_to_npz(WEIGHTS) != weights_to_npz(changed)


def test_load_round_trips_names_values_and_dtypes(tmp_path: Path) -> None:
    saved = CheckpointDir(tmp_path).save(0, WEIGHTS)

    loaded = load_weights(saved.path, expected_sha256=saved.sha256)

    assert list(loaded) == list(WEIGHTS)
    for name, array in WEIGHTS.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype


def test_load_detects_a_corrupted_file(tmp_path: Path) -> None:
    saved = CheckpointDir(tmp_path).save(1, WEIGHTS)
    raw = bytearray(saved.path.read_bytes())
    raw[-10] ^= 0xFF
    saved.path.write_bytes(bytes(raw))

    with pytest.raises(StorageError, match="is corrupt: SHA-256"):
        load_weights(saved.path, expected_sha256=saved.sha256)


def test_load_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot read checkpoint"):
        load_weights(tmp_path / "round-0001.npz", expected_sha256="0" * 64)


def test_unsafe_weight_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outside"):
        CheckpointDir(tmp_path).save(0, {"../escape": np.zeros(1)})


def test_negative_round_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server_round must be >= 0"):
        CheckpointDir(tmp_path).save(-1, WEIGHTS)


def test_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(StorageError, match="cannot write checkpoint"):
        CheckpointDir(blocker / "models").save(0, WEIGHTS)
