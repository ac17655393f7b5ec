"""The ``fedge`` command starts without importing torch, Flower or ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from fedge.cli import MOUNTS, load_group
from tests.unit.fedge.test_cli_errors import run_cli

HEAVY = ("torch", "flwr", "onnxruntime", "opacus", "ray")


def test_importing_the_command_imports_no_heavy_package() -> None:
    probe = f"import sys, fedge.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"

    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == ""


@pytest.mark.parametrize("args", [["--help"], ["version"]])
def test_help_and_version_import_no_heavy_package(args: list[str]) -> None:
    probe = (
        "import sys\n"
        "from fedge.cli import main\n"
        f"main({args!r})\n"
        f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip().splitlines()[-1] == "heavy:"


@pytest.mark.parametrize("name", sorted(MOUNTS))
def test_each_mount_lists_the_groups_own_help(name: str) -> None:
    group = load_group(name)

    assert isinstance(group, typer.core.TyperGroup)
    assert group.help == MOUNTS[name].help
    assert group.list_commands(typer.Context(group))  # it has commands


def test_root_help_lists_every_group(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")

    assert code == 0
    for name in (*MOUNTS, "version", "--home"):
        assert name in out


def test_an_unknown_group_is_suggested_once(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "stor")

    assert code == 2
    assert err.strip() == (
        "fedge: error: No such command 'stor'. Did you mean 'store'? (see 'fedge --help')"
    )


def test_an_unknown_command_in_a_group_is_suggested_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, err = run_cli(capsys, "audit", "lis")

    assert err.count("Did you mean 'list'?") == 1
