"""The import direction of ARCHITECTURE.md, enforced by import-linter contracts (pyproject)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "fedge",
    "fl_server",
    "fl_client",
    "secure_agg",
    "edge_runtime",
    "strategies",
    "simulations",
)


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "lint-imports"
    if not executable.exists():
        pytest.fail(f"import-linter is not installed next to {sys.executable}: run `make setup`")
    return subprocess.run(
        [str(executable), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PYTHONPATH": str(cwd), "PATH": str(executable.parent)},
    )


def test_the_tree_keeps_every_contract() -> None:
    result = _lint_imports(ROOT)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("secure_agg/_bad.py", "import fl_server\n", "Packages import only downwards"),
        ("secure_agg/_bad.py", "import torch\n", "secure_agg is pure"),
        ("fl_client/_bad.py", "import fl_server.audit\n", "Packages import only downwards"),
        ("fl_server/_bad.py", "import simulations.run\n", "Packages import only downwards"),
        ("strategies/_bad.py", "import flwr\n", "strategies knows nothing"),
    ],
)
def test_an_upward_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / module).write_text(line)

    result = _lint_imports(tmp_path)

    assert result.returncode != 0
    assert f"{contract}" in result.stdout
    assert "BROKEN" in result.stdout
