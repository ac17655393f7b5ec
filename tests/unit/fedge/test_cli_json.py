"""``--json`` on every listing command: machine-readable output on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.fedge.test_cli import _audit_db
from tests.unit.fedge.test_cli_errors import KEY, publish_store, run_cli


def test_store_list_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    env = publish_store(tmp_path)

    code, out, err = run_cli(
        capsys, "store", "list", "--json",
        "--db-url", env["FEDGE_DB_URL"], "--store-dir", env["FEDGE_STORE_DIR"],
    )  # fmt: skip

    assert code == 0, err
    rows = json.loads(out)
    assert [(row["model"], row["version"]) for row in rows] == [("cnn", 1), ("cnn", 2)]
    assert set(rows[0]) == {
        "model", "version", "parent", "server_round", "dp_epsilon", "artefacts", "aliases",
        "run_id", "run_outcome", "run_trail_problem", "accuracy", "dp_mode",
    }  # fmt: skip
    assert rows[0]["aliases"] == ["production"] and rows[1]["aliases"] == []
    assert rows[0]["artefacts"] == ["weights.npz"]


def test_store_variants_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    env = publish_store(tmp_path)

    code, out, err = run_cli(
        capsys, "store", "variants", "cnn", "production", "--json",
        "--db-url", env["FEDGE_DB_URL"], "--store-dir", env["FEDGE_STORE_DIR"],
    )  # fmt: skip

    assert code == 0, err
    document = json.loads(out)
    assert document["model"] == "cnn" and document["version"] == 1
    [artefact] = document["artefacts"]
    assert artefact["name"] == "weights.npz" and artefact["size"] == 2
    assert set(artefact) == {"name", "precision", "status", "size", "quality"}


def test_audit_list_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = _audit_db(tmp_path)

    code, out, err = run_cli(capsys, "audit", "list", "--db-url", url, "--last", "2", "--json")

    assert code == 0, err
    records = json.loads(out)
    assert [(r["seq"], r["kind"], r["run_id"]) for r in records] == [
        (2, "round.completed", "run-1"),
        (3, "run.completed", "run-1"),
    ]
    assert records[0]["payload"] == {"round": 1, "accuracy": 0.5}
    assert all(r["problem"] is None for r in records)


def _ledger_db(tmp_path: Path) -> str:
    from fl_server.db import open_database
    from fl_server.ledger import PrivacyLedger, RoundSpend

    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    engine = open_database(url)
    try:
        ledger = PrivacyLedger(engine)
        spend = RoundSpend(mechanism="ddg", rho=0.05)
        for server_round in (1, 2):
            ledger.record("run-x", server_round, spend, delta=1e-5)
            ledger.record_many("run-x", server_round, {"7": spend}, delta=1e-5)
    finally:
        engine.dispose()
    return url


def test_ledger_show_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = _ledger_db(tmp_path)

    code, out, err = run_cli(capsys, "ledger", "show", "--db-url", url, "--json")
    _, subject, _ = run_cli(capsys, "ledger", "show", "--db-url", url, "--subject", "7", "--json")

    assert code == 0, err
    document = json.loads(out)
    assert document["run_id"] == "run-x"
    assert [(e["subject"], e["round"]) for e in document["entries"]] == [("run", 1), ("run", 2)]
    assert document["clients"]["charged"] == 1 and document["clients"]["worst_client"] == "7"
    client = json.loads(subject)
    assert client["subject"] == "7"
    assert [(r["run_id"], r["rounds"]) for r in client["runs"]] == [("run-x", 2)]
    assert client["lifetime_epsilon"] > 0


def test_client_ledger_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from fl_client.budget import ClientLedger, ClientSpend
    from strategies.accounting import GaussianSteps

    devices = tmp_path / "devices"
    spend = ClientSpend(
        mechanism="central-gaussian",
        gaussian=GaussianSteps(noise_multiplier=2.0, sample_rate=1.0, steps=1),
    )
    ClientLedger(devices / "device-3.jsonl").record(1, spend)

    code, out, err = run_cli(capsys, "client", "ledger", "--devices-dir", str(devices), "--json")

    assert code == 0, err
    [row] = json.loads(out)
    assert row["device"] == "3" and row["rounds"] == 1 and row["refused"] == 0
    assert row["epsilon"] > 0 and row["delta"] == 1e-5


def test_client_models_list_json_on_an_empty_cache(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_cli(
        capsys, "client", "models", "list", "--json", "--store-key", KEY,
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip

    assert code == 0, err
    assert json.loads(out) == []
