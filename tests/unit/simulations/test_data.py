from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedge.errors import DataError
from simulations.data import DATA_DIR_ENV, DEFAULT_DATA_DIR, load_fashion_mnist, resolve_data_dir
from tests.conftest import make_synthetic_fashion, write_idx


def test_loads_gzipped_files_with_their_shapes(fashion_dir: Path) -> None:
    data = load_fashion_mnist(fashion_dir)

    assert data.train.images.shape == (200, 28, 28)
    assert data.train.labels.shape == (200,)
    assert data.test.images.shape == (50, 28, 28)
    assert data.train.images.dtype == np.uint8
    assert int(data.train.labels.max()) <= 9


def test_loads_uncompressed_files_identically(tmp_path: Path) -> None:
    packed = load_fashion_mnist(make_synthetic_fashion(tmp_path / "gz", seed=3))
    plain = load_fashion_mnist(make_synthetic_fashion(tmp_path / "raw", seed=3, compress=False))

    np.testing.assert_array_equal(packed.train.images, plain.train.images)
    np.testing.assert_array_equal(packed.test.labels, plain.test.labels)


def test_missing_directory_says_how_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_missing_file_is_named(fashion_dir: Path) -> None:
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found.*--data-dir"):
        load_fashion_mnist(fashion_dir)


def test_truncated_file_is_rejected(fashion_dir: Path) -> None:
    path = fashion_dir / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))

    with pytest.raises(DataError, match=r"truncated or padded.*holds 156700 bytes"):
        load_fashion_mnist(fashion_dir)


def test_file_shorter_than_its_header_is_rejected(fashion_dir: Path) -> None:
    (fashion_dir / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08"))

    with pytest.raises(DataError, match="shorter than its header"):
        load_fashion_mnist(fashion_dir)


def test_wrong_magic_number_is_rejected(fashion_dir: Path) -> None:
    path = fashion_dir / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2] = 0x0D  # float elements instead of unsigned bytes
    path.write_bytes(gzip.compress(bytes(raw)))

    with pytest.raises(DataError, match=r"magic number 0x00000d01, expected 0x00000801"):
        load_fashion_mnist(fashion_dir)


def test_corrupt_gzip_stream_is_rejected(fashion_dir: Path) -> None:
    path = fashion_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(DataError, match=r"cannot read .*t10k-images.*corrupt"):
        load_fashion_mnist(fashion_dir)


def test_images_and_labels_must_agree_in_count(fashion_dir: Path) -> None:
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte", np.zeros(49, dtype=np.uint8))

    with pytest.raises(DataError, match=r"holds 50 images but .* holds 49 labels"):
        load_fashion_mnist(fashion_dir)


def test_images_must_be_28_by_28(fashion_dir: Path) -> None:
    write_idx(fashion_dir / "t10k-images-idx3-ubyte", np.zeros((50, 32, 32), dtype=np.uint8))

    with pytest.raises(DataError, match=r"shape \(32, 32\), expected \(28, 28\)"):
        load_fashion_mnist(fashion_dir)


def test_labels_must_be_classes_0_to_9(fashion_dir: Path) -> None:
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte", np.full(50, 12, dtype=np.uint8))

    with pytest.raises(DataError, match=r"holds label 12, expected 0\.\.9"):
        load_fashion_mnist(fashion_dir)


def test_data_dir_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir() == DEFAULT_DATA_DIR

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"


def test_environment_variable_is_used_by_the_loader(
    monkeypatch: pytest.MonkeyPatch, fashion_dir: Path
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(fashion_dir))

    assert len(load_fashion_mnist().test) == 50


@pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_has_its_published_sizes() -> None:
    data = load_fashion_mnist(DEFAULT_DATA_DIR)

    assert (len(data.train), len(data.test)) == (60_000, 10_000)
    assert np.bincount(data.train.labels).tolist() == [6000] * 10
