"""Shared fixtures: generated IDX data, databases (SQLite always, PostgreSQL when configured)."""

from __future__ import annotations

import gzip
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text

from simulations.offline import apply_offline_env

POSTGRES_ENV = "FEDGE_TEST_POSTGRES_URL"

apply_offline_env()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``compress``."""
    header = bytes((0, 0, 0x08, array.ndim)) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    target = path.with_name(path.name + ".gz") if compress else path
    target.write_bytes(gzip.compress(data) if compress else data)
    return target


def make_synthetic_fashion(
    directory: Path, *, train: int = 200, test: int = 50, seed: int = 0, compress: bool = True
) -> Path:
    """Write a small, learnable Fashion-MNIST look-alike: each class is a bright stripe."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
        for index, label in enumerate(labels):
            images[index, 2 + 2 * int(label) : 4 + 2 * int(label), :] = 250
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress=compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)
    return directory


@pytest.fixture(autouse=True)
def fedge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``FEDGE_HOME`` at a per-test directory (not created): no test writes to ~/.fedge."""
    home = tmp_path / "fedge-home"
    monkeypatch.setenv("FEDGE_HOME", str(home))
    return home


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    return make_synthetic_fashion(tmp_path / "fashion")


def _postgres_base_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to a fresh, empty schema on the test PostgreSQL server (dropped afterwards)."""
    base = _postgres_base_url()
    if base is None:
        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_ENV} (set by .ci/run when the server answers)"
        )
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database fedge supports: a SQLite file, and PostgreSQL when configured."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fedge.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    from fl_server.db import open_database

    created = open_database(db_url)
    try:
        yield created
    finally:
        created.dispose()
