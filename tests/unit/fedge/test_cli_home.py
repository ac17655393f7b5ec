"""One fedge home: --home, else $FEDGE_HOME, else ~/.fedge; explicit paths still win."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge.home import (
    HOME_ENV,
    FedgeHome,
    check_writable_directory,
    check_writable_file,
    resolve_home,
)
from tests.unit.fedge.test_cli_errors import assert_one_error_line, publish_store, run_cli


def test_an_explicit_home_wins_over_the_environment(tmp_path: Path) -> None:
    assert resolve_home(tmp_path / "a", environ={HOME_ENV: str(tmp_path / "b")}) == tmp_path / "a"


def test_the_environment_wins_over_the_default(tmp_path: Path) -> None:
    assert resolve_home(environ={HOME_ENV: str(tmp_path / "b")}) == tmp_path / "b"


def test_the_default_is_dot_fedge_in_the_users_home() -> None:
    assert resolve_home(environ={}) == Path.home() / ".fedge"
    assert resolve_home(environ={HOME_ENV: ""}) == Path.home() / ".fedge"


def test_the_layout() -> None:
    home = FedgeHome(root=Path("/h"))

    assert home.db_url == "sqlite:////h/fedge.db"
    assert home.store_dir == Path("/h/store")
    assert home.runs_dir == Path("/h/runs")
    assert home.devices_dir == Path("/h/devices")
    assert home.cache_dir == Path("/h/client/cache")


def test_writable_checks_create_nothing(tmp_path: Path) -> None:
    check_writable_directory(tmp_path / "new" / "deeper", option="--x")
    check_writable_file(tmp_path / "new" / "file.json", option="--x")

    assert list(tmp_path.iterdir()) == []


def test_writable_checks_refuse_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    with pytest.raises(ConfigError, match=r"--x .*file is not a directory"):
        check_writable_directory(tmp_path / "file", option="--x")
    with pytest.raises(ConfigError, match=r"--x .*file/sub: .*file is not a directory"):
        check_writable_directory(tmp_path / "file" / "sub", option="--x")
    with pytest.raises(ConfigError, match=r"--out .* is a directory; give a file path"):
        check_writable_file(tmp_path, option="--out")


@pytest.mark.parametrize("where", ["root", "command", "environment"])
def test_commands_use_the_home_however_it_is_given(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    where: str,
) -> None:
    home = tmp_path / "home"
    publish_store(home)  # fedge.db and store/ in the home
    args = ["store", "list", "--json"]
    if where == "root":
        args = ["--home", str(home), *args]
    elif where == "command":
        args = [*args, "--home", str(home)]
    else:
        monkeypatch.setenv(HOME_ENV, str(home))

    code, out, err = run_cli(capsys, *args)

    assert code == 0, err
    assert [row["version"] for row in json.loads(out)] == [1, 2]
    assert os.environ[HOME_ENV] != str(home) or where == "environment"  # root --home undone


def test_a_commands_home_wins_over_the_roots(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    publish_store(tmp_path / "good")

    code, _, err = run_cli(
        capsys, "--home", str(tmp_path / "bad"), "store", "list", "--home", str(tmp_path / "good")
    )

    assert code == 0, err
    assert not (tmp_path / "bad").exists()


def test_explicit_paths_win_over_the_home(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = publish_store(tmp_path / "elsewhere")

    code, out, err = run_cli(
        capsys, "--home", str(tmp_path / "empty"), "store", "list", "--json",
        "--db-url", env["FEDGE_DB_URL"], "--store-dir", env["FEDGE_STORE_DIR"],
    )  # fmt: skip

    assert code == 0, err
    assert len(json.loads(out)) == 2
    assert not (tmp_path / "empty").exists()


def test_the_store_key_names_the_homes_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(capsys, "--home", str(tmp_path / "h"), "store", "key")

    assert code == 1
    assert_one_error_line(err, rf"no model store at {tmp_path}/h/store")
