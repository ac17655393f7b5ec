"""``fedge store list`` for a release manager, and ``fedge store tag`` under the release policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact, VersionInfo
from strategies.dp_mode import DpMode
from tests.unit.fedge.test_cli_errors import assert_one_error_line, run_cli

RUN = "20261127T053000Z-9f3a1c"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home whose store holds the versions of three runs and one published by hand.

    v1: round 0 of RUN (completed, central DP); v2: its round 1, accuracy 0.8123,
    epsilon 1.234, tagged production; v3: round 1 of run-failed (no DP); v4: a run
    still going; v5: published by hand.
    """
    root = tmp_path / "home"
    engine = open_database(f"sqlite:///{root / 'fedge.db'}")
    try:
        audit = AuditLog(engine)
        store = ModelStore(
            engine,
            FileBlobStore(root / "store"),
            StoreKey.load_or_create(root / "store" / "store-key.pem"),
            audit=audit,
        )
        for started, end in [
            (RUN, AuditEventKind.RUN_COMPLETED),
            ("run-failed", AuditEventKind.RUN_FAILED),
            ("run-going", None),
        ]:
            audit.append(AuditEventKind.RUN_STARTED, {}, run_id=started)
            if end is not None:
                audit.append(end, {"status": "failed"}, run_id=started)
        for run_id, server_round, mode, epsilon, accuracy in [
            (RUN, 0, DpMode.CENTRAL, 0.0, 0.1),
            (RUN, 1, DpMode.CENTRAL, 1.234, 0.8123),
            ("run-failed", 1, DpMode.OFF, None, 0.9),
            ("run-going", 1, DpMode.OFF, None, 0.9),
            (None, None, None, None, None),
        ]:
            store.publish(
                "cnn",
                [NewArtefact(name="weights.npz", data=f"{run_id}{server_round}".encode())],
                info=VersionInfo(
                    run_id=run_id,
                    server_round=server_round,
                    dp_mode=mode,
                    dp_epsilon=epsilon,
                    metrics={} if accuracy is None else {"accuracy": accuracy},
                ),
            )
        store.tag("cnn", "production", 2)
    finally:
        engine.dispose()
    return root


def _events(home: Path, kind: AuditEventKind) -> list[dict[str, object]]:
    engine = open_database(f"sqlite:///{home / 'fedge.db'}", create=False)
    try:
        return [dict(e.payload) for e in AuditLog(engine).iter() if e.kind is kind]
    finally:
        engine.dispose()


def _aliases(capsys: pytest.CaptureFixture[str], home: Path) -> dict[int, list[str]]:
    code, out, err = run_cli(capsys, "store", "list", "--json", "--home", str(home))
    assert code == 0, err
    return {row["version"]: row["aliases"] for row in json.loads(out)}


# --- store list ----------------------------------------------------------------------


def test_store_list_shows_run_round_accuracy_dp_and_outcome(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    code, out, err = run_cli(capsys, "store", "list", "--home", str(home))

    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == [
        "model", "ver", "parent", "run", "round", "accuracy", "dp", "epsilon", "outcome",
        "artefacts",
    ]  # fmt: skip
    assert rows[1].split() == [
        "cnn", "2", "-", "20261127..9f3a1c", "1", "0.8123", "central", "1.234", "completed",
        "weights.npz", "[production]",
    ]  # fmt: skip
    assert rows[2].split()[3:9] == ["run-failed", "1", "0.9000", "off", "-", "failed"]
    assert rows[3].split()[8] == "running"
    assert rows[4].split()[3:9] == ["-", "-", "-", "-", "-", "-"]  # published by hand


def test_store_list_json_has_every_column_and_the_whole_run_id(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    code, out, err = run_cli(capsys, "store", "list", "--json", "--home", str(home))

    assert code == 0, err
    rows = json.loads(out)
    assert rows[1] == {
        "model": "cnn",
        "version": 2,
        "parent": None,
        "run_id": RUN,
        "run_outcome": "completed",
        "run_trail_problem": None,
        "server_round": 1,
        "accuracy": 0.8123,
        "dp_mode": "central",
        "dp_epsilon": 1.234,
        "artefacts": ["weights.npz"],
        "aliases": ["production"],
    }
    assert [row["run_outcome"] for row in rows] == [
        "completed", "completed", "failed", "running", None,
    ]  # fmt: skip
    assert rows[4]["dp_mode"] is None and rows[4]["accuracy"] is None


def test_store_list_marks_a_damaged_trail(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    engine = open_database(f"sqlite:///{home / 'fedge.db'}", create=False)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "UPDATE audit_events SET kind = 'run.completed' WHERE kind = 'run.failed'"
            )
    finally:
        engine.dispose()

    code, out, err = run_cli(capsys, "store", "list", "--home", str(home))

    assert code == 0, err
    lines = out.splitlines()
    assert lines[3].split()[8] == "running*"
    assert lines[-1].startswith("* the audit trail of run run-failed: record ")


# --- store tag -----------------------------------------------------------------------


def test_a_refused_release_is_one_error_line_and_one_audit_event(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    code, out, err = run_cli(capsys, "store", "tag", "cnn", "production", "3", "--home", str(home))

    assert code == 1 and out == ""
    assert_one_error_line(
        err,
        r"^fedge: error: release refused: cnn production -> v3: run run-failed of cnn v3 did "
        r"not complete \(the audit trail says failed\); production \(v2\) is DP \(central\), "
        r"epsilon 1.234 but cnn v3 is not differentially private: a non-private model never "
        r"replaces a private one \(--override REASON moves it anyway\)$",
    )
    assert _aliases(capsys, home)[2] == ["production"]
    [refused] = _events(home, AuditEventKind.RELEASE_REFUSED)
    assert refused["model"] == "cnn" and refused["alias"] == "production"
    assert refused["version"] == 3 and len(refused["reasons"]) == 2  # type: ignore[arg-type]
    assert len(_events(home, AuditEventKind.ALIAS_MOVED)) == 1  # the fixture's own


@pytest.mark.parametrize(
    ("ref", "pattern"),
    [
        ("1", r"-> v1: cnn v1 holds round 0: the untrained initial weights \(--override"),
        ("4", r"run run-going of cnn v4 did not complete \(the audit trail says running\)"),
        ("latest", r"cnn v5 records no run \(published by hand\)"),
    ],
)
def test_tag_refuses_each_unfit_version(
    capsys: pytest.CaptureFixture[str], home: Path, ref: str, pattern: str
) -> None:
    code, _, err = run_cli(capsys, "store", "tag", "cnn", "canary", ref, "--home", str(home))

    assert code == 1
    assert_one_error_line(err, pattern)
    assert all("canary" not in tags for tags in _aliases(capsys, home).values())


def test_an_override_moves_the_alias_and_is_audited(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    code, out, err = run_cli(
        capsys, "store", "tag", "cnn", "production", "3", "--home", str(home),
        "--override", "CVE fix; DP retrain follows",
    )  # fmt: skip

    assert code == 0, err
    moved_line, override_line = out.splitlines()
    assert moved_line == "cnn production -> v3 (was v2)"
    assert override_line.startswith("release policy overridden (run run-failed of cnn v3 did")
    assert override_line.endswith("): CVE fix; DP retrain follows")
    assert _aliases(capsys, home)[3] == ["production"]
    moved = _events(home, AuditEventKind.ALIAS_MOVED)[-1]
    assert moved["override"] == "CVE fix; DP retrain follows"
    assert len(moved["overridden"]) == 2  # type: ignore[arg-type]
    assert (moved["version"], moved["previous"]) == (3, 2)


def test_an_allowed_release_and_an_unprotected_alias_move(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    code, out, err = run_cli(capsys, "store", "tag", "cnn", "canary", "2", "--home", str(home))
    assert (code, out.strip()) == (0, "cnn canary -> v2"), err

    code, out, err = run_cli(capsys, "store", "tag", "cnn", "staging", "1", "--home", str(home))
    assert (code, out.strip()) == (0, "cnn staging -> v1"), err

    assert _aliases(capsys, home)[1] == ["staging"]
    assert _events(home, AuditEventKind.RELEASE_REFUSED) == []


def test_the_homes_policy_file_is_applied(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    (home / "release-policy.toml").write_text(
        'protected_aliases = ["production"]\nallow_manual_publish = true\nmax_epsilon = 1.0\n'
    )

    code, _, err = run_cli(capsys, "store", "tag", "cnn", "production", "2", "--home", str(home))
    assert code == 1
    assert_one_error_line(err, r"cnn v2 spent epsilon 1.234, above the policy's max_epsilon 1 ")

    code, _, err = run_cli(capsys, "store", "tag", "cnn", "canary", "5", "--home", str(home))
    assert code == 0, err  # canary is no longer protected


def test_a_bad_policy_file_is_one_error_line_and_moves_nothing(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    (home / "release-policy.toml").write_text("max_accuracy_drop = 5\n")

    code, _, err = run_cli(capsys, "store", "tag", "cnn", "staging", "2", "--home", str(home))

    assert code == 1
    assert_one_error_line(
        err, r"release-policy.toml: max_accuracy_drop must be a number in \[0, 1\], got 5.0$"
    )
    assert _aliases(capsys, home)[2] == ["production"]
