"""The command line: help, version, and one clear line for every kind of bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_synthetic_fashion


def _fedge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, "COLUMNS": "100", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args],
        capture_output=True,
        text=True,
        env=merged,
        timeout=300,
        check=False,
    )


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedge: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_help_lists_the_command_groups() -> None:
    result = _fedge("--help")

    assert result.returncode == 0
    assert "sim" in result.stdout
    assert "version" in result.stdout


def test_sim_run_help_documents_the_flags() -> None:
    result = _fedge("sim", "run", "--help")

    assert result.returncode == 0
    for flag in ("--clients", "--rounds", "--seed", "--out", "--data-dir", "--alpha"):
        assert flag in result.stdout


def test_version_prints_the_package_version() -> None:
    result = _fedge("version")

    assert result.returncode == 0
    assert result.stdout.startswith("fedge 0.1.0")


def test_unknown_flag(tmp_path: Path) -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--bogus"), r"No such option '--bogus'.*see 'fedge sim run --help'"
    )


def test_zero_clients() -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--clients", "0"), r"--clients.*0 is not in the range x>=1"
    )


def test_non_positive_alpha(tmp_path: Path) -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--alpha", "0", "--runs-dir", str(tmp_path)),
        r"alpha must be > 0, got 0.0",
    )


def test_unknown_partition_mode() -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--partition", "random"), r"--partition.*'random' is not one of"
    )


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    result = _fedge("sim", "run", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path))

    _assert_one_clear_line(result, r"does not exist.*apt-get install dataset-fashion-mnist")


def test_corrupt_data_is_reported(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data")
    (data / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")

    result = _fedge("sim", "run", "--data-dir", str(data), "--runs-dir", str(tmp_path))

    _assert_one_clear_line(result, r"cannot read .*train-labels.*corrupt")


def test_more_clients_than_examples(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=20, test=10)

    result = _fedge(
        "sim", "run", "--clients", "50", "--data-dir", str(data), "--runs-dir", str(tmp_path)
    )

    _assert_one_clear_line(result, r"cannot split 20 examples across 50 clients")


def test_data_dir_from_the_environment(tmp_path: Path) -> None:
    result = _fedge(
        "sim",
        "run",
        "--runs-dir",
        str(tmp_path),
        env={"FEDGE_DATA_DIR": str(tmp_path / "from-env")},
    )

    _assert_one_clear_line(result, r"from-env does not exist")
