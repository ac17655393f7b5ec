"""``fedge rollout``: the commands a release manager types, their output and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_server.store.cli import open_store
from fl_server.store.store import NewArtefact, VersionInfo
from tests.unit.fedge.test_cli_errors import assert_one_error_line, run_cli


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    with open_store(None, None, home=root, create=True) as store:
        for tag in (b"1", b"2", b"3"):
            store.publish(
                "cnn",
                [NewArtefact(name="weights.npz", data=b"w" + tag)],
                info=VersionInfo(server_round=3, metrics={"accuracy": 0.9}),
            )
        store.tag("cnn", "production", 1)
    return root


def _allow_manual_publishes(home: Path) -> None:
    (home / "release-policy.toml").write_text("allow_manual_publish = true\n")


def test_a_rollout_from_start_to_rollback(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _allow_manual_publishes(home)
    code, out, err = run_cli(
        capsys, "rollout", "start", "cnn", "2", "--stages", "5,50,100", "--bake", "0",
        "--home", str(home), "--json",
    )  # fmt: skip
    assert code == 0, err
    rollout = json.loads(out)
    assert (rollout["state"], rollout["fraction"], rollout["previous"]) == ("running", 0.05, 1)
    rollout_id = rollout["id"]

    code, out, _ = run_cli(capsys, "rollout", "status", "--home", str(home))
    assert code == 0 and rollout_id in out and "running" in out
    code, out, _ = run_cli(capsys, "rollout", "status", rollout_id, "--home", str(home))
    assert code == 0
    assert "stages: [5%] -> 50% -> 100%" in out
    assert "gates: wait" in out  # no device has reported: never a promotion
    code, out, _ = run_cli(capsys, "rollout", "status", rollout_id, "--home", str(home), "--json")
    status = json.loads(out)
    assert status["verdict"] == "wait" and status["directive"]["directive"]["version"] == 2

    assert run_cli(capsys, "rollout", "pause", rollout_id, "--home", str(home))[0] == 0
    assert run_cli(capsys, "rollout", "resume", rollout_id, "--home", str(home))[0] == 0
    code, out, _ = run_cli(capsys, "rollout", "promote", rollout_id, "--force", "--home", str(home))
    assert code == 0 and "50 %" in out
    code, out, _ = run_cli(
        capsys, "rollout", "rollback", rollout_id, "--reason", "field regression",
        "--home", str(home),
    )  # fmt: skip
    assert code == 0 and "returns to cnn v1" in out

    code, _, err = run_cli(capsys, "rollout", "resume", rollout_id, "--home", str(home))
    assert code == 1
    assert_one_error_line(err, "cannot resume a rolled_back rollout")


def test_the_release_policy_is_checked_before_a_rollout_starts(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "rollout", "start", "cnn", "2", "--home", str(home))

    assert code == 1
    assert_one_error_line(err, "release policy refuses cnn v2: .*no run")
    assert run_cli(capsys, "rollout", "status", "--home", str(home))[1].strip() == "no rollouts"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "cnn", "2", "--stages", "5,fifty"], "--stages takes percentages"),
        (["start", "cnn", "2", "--stages", "5,50"], "must end at 1.0"),
        (["start", "cnn", "2", "--stages", "50,5,100"], "must increase strictly"),
        (["start", "cnn", "9"], "cnn has no version 9"),
        (["promote", "nope-v1-000000"], "no rollout 'nope-v1-000000'"),
        (["status", "nope-v1-000000"], "no rollout 'nope-v1-000000'"),
    ],
)
def test_bad_input_is_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    _allow_manual_publishes(home)
    code, _, err = run_cli(capsys, "rollout", *args, "--home", str(home))
    assert code == 1
    assert_one_error_line(err, message)


def test_status_creates_nothing_without_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    code, _, err = run_cli(capsys, "rollout", "status", "--home", str(empty))
    assert code == 1
    assert "fedge: error:" in err
    assert not empty.exists()
