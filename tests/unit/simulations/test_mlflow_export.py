"""The MLflow export: read back params, metrics per round, tags and artefacts; secrets masked."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedge.errors import ConfigError, StorageError
from simulations.mlflow_export import MAX_PARAM_VALUE_LENGTH, export_to_mlflow, masked_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store for the module: creating MLflow's SQLite schema takes a second or two.
    pytest.importorskip("mlflow")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _summary(status: str = "completed", **overrides: Any) -> dict[str, Any]:
    # The shape `fedge sim run --secure-agg --dp distributed` writes, plus the per-round counts.
    def entry(number: int, accuracy: float, epsilon: float, dropped: int) -> dict[str, Any]:
        return {
            "round": number,
            "accuracy": accuracy,
            "loss": 2.0 - accuracy,
            "seconds": 1.5,
            "replies": 3 - dropped,
            "failures": dropped,
            "sampled": 3,
            "completed": 3 - dropped,
            "dropped": dropped,
            "refused": {"privacy_budget": dropped} if dropped else {},
            "epsilon": epsilon,
            "model_sha256": "cd" * 32,
            "model_path": f"/tmp/home/runs/r/models/round-{number:04d}.npz",
            "secure_aggregation": {"sampled": 3, "survivors": 3 - dropped, "aborted": None},
            "store_version": number,
        }

    summary = {
        "run_id": "20261202T222230Z-44a276",
        "status": status,
        "final_accuracy": 0.6,
        "initial_accuracy": 0.107,
        "rounds": [entry(1, 0.5, 3.0, 0), entry(2, 0.6, 4.5, 1)],
        "config": {
            "num_clients": 3,
            "dp": "distributed",
            "secure_agg": True,
            "client_epsilon": None,
            "data_dir": "x" * 700,
            "train": {"learning_rate": 0.05, "local_epochs": 1},
        },
        "config_sha256": "6b" * 32,
        "data": {"train_examples": 3000},
        "wall_seconds": 23.4,
        "audit": {"db_url": "postgresql://fedge:hunter2@db/fedge", "head_hash": "83" * 32},
        "code_version": "0.1.0+gcfdf0095f7b2",
        "error": None,
        "privacy": {
            "mechanism": "distributed-ddg",
            "epsilon": 4.5,
            "budget": 8.0,
            "max_client_epsilon": 4.5,
        },
    }
    summary.update(overrides)
    return summary


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_a_run_reads_back_with_params_metrics_tags_and_artifacts(
    tracking_uri: str, tmp_path: Path
) -> None:
    plot = tmp_path / "accuracy.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nnot really")

    run_id = export_to_mlflow(_summary(), tracking_uri, experiment="readback", plots=[plot])

    client = _client(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "readback"
    params = run.data.params
    assert params["train.learning_rate"] == "0.05"
    assert params["train.local_epochs"] == "1"
    assert params["dp"] == "distributed"
    assert params["secure_agg"] == "true"
    assert params["client_epsilon"] == "null"
    assert len(params["data_dir"]) == MAX_PARAM_VALUE_LENGTH
    assert params["data_dir"].endswith("…")
    assert _history(client, run_id, "accuracy") == [(0, 0.107), (1, 0.5), (2, 0.6)]
    assert _history(client, run_id, "epsilon") == [(1, 3.0), (2, 4.5)]
    assert _history(client, run_id, "participation/sampled") == [(1, 3.0), (2, 3.0)]
    assert _history(client, run_id, "participation/dropped") == [(1, 0.0), (2, 1.0)]
    assert _history(client, run_id, "participation/refused") == [(1, 0.0), (2, 1.0)]
    assert _history(client, run_id, "final_accuracy") == [(2, 0.6)]
    tags = run.data.tags
    assert tags["fedge.run_id"] == "20261202T222230Z-44a276"
    assert tags["fedge.config_sha256"] == "6b" * 32
    assert tags["fedge.audit_head"] == "83" * 32
    assert tags["fedge.status"] == "completed"
    assert tags["fedge.dp"] == "distributed"
    assert tags["mlflow.runName"] == "20261202T222230Z-44a276"
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/accuracy.png"]
    uploaded = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path)))
    document = json.loads(uploaded.read_text())
    assert document["rounds"] == _summary()["rounds"]
    # The summary's own database password does not travel to MLflow.
    assert document["audit"]["db_url"] == "postgresql://fedge:***@db/fedge"
    assert "hunter2" not in uploaded.read_text()


def test_a_summary_without_per_round_epsilon_exports_the_total_at_the_last_round(
    tracking_uri: str,
) -> None:
    summary = _summary()
    for entry in summary["rounds"]:
        for key in ("epsilon", "sampled", "completed", "dropped", "refused"):
            del entry[key]

    run_id = export_to_mlflow(summary, tracking_uri, experiment="older")

    client = _client(tracking_uri)
    assert _history(client, run_id, "epsilon") == [(2, 4.5)]
    # The counts fall back on the secure round's sampled and the replies.
    assert _history(client, run_id, "participation/completed") == [(1, 3.0), (2, 2.0)]
    assert _history(client, run_id, "participation/dropped") == [(1, 0.0), (2, 1.0)]
    assert _history(client, run_id, "participation/refused") == []


@pytest.mark.parametrize(
    ("status", "mlflow_status"), [("failed", "FAILED"), ("interrupted", "KILLED")]
)
def test_an_unfinished_run_is_marked_so(tracking_uri: str, status: str, mlflow_status: str) -> None:
    run_id = export_to_mlflow(_summary(status, rounds=[]), tracking_uri, experiment="unfinished")

    run = _client(tracking_uri).get_run(run_id)
    assert run.info.status == mlflow_status
    assert run.data.tags["fedge.status"] == status
    assert _history(_client(tracking_uri), run_id, "accuracy") == [(0, 0.107)]


def test_a_deleted_experiment_is_refused(tracking_uri: str) -> None:
    client = _client(tracking_uri)
    client.delete_experiment(client.create_experiment("gone"))

    with pytest.raises(ConfigError, match="experiment 'gone' is deleted"):
        export_to_mlflow(_summary(), tracking_uri, experiment="gone")


def test_a_file_store_needs_mlflows_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)

    with pytest.raises(ConfigError, match=r"use sqlite:///PATH/mlflow\.db"):
        export_to_mlflow(_summary(), uri)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_id = export_to_mlflow(_summary(), uri)
    assert _history(_client(uri), run_id, "accuracy")[-1] == (2, 0.6)


def test_an_unreachable_server_is_reported_without_its_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    caplog.set_level(logging.DEBUG)
    # Port 9 (discard) on loopback: refused at once.
    uri = "http://alice:s3cr%40t@127.0.0.1:9/?token=tok3n"

    with pytest.raises(StorageError, match=r"at http://alice:\*\*\*@127\.0\.0\.1:9/") as caught:
        export_to_mlflow(_summary(), uri)

    assert caught.value.__cause__ is None
    for secret in ("s3cr", "tok3n"):
        assert secret not in str(caught.value)
        assert secret not in caplog.text


def test_the_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)

    with pytest.raises(ConfigError, match=r"pip install 'fedge\[mlflow\]'"):
        export_to_mlflow(_summary(), "sqlite:///unused.db")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tracking_uri": " "}, "tracking URI must not be empty"),
        ({"experiment": ""}, "experiment name must not be empty"),
        ({"plots": [Path("/nonexistent/accuracy.png")]}, "plot files not found"),
    ],
)
def test_bad_arguments_are_refused_before_mlflow_is_touched(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], message: str
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    arguments: dict[str, Any] = {"tracking_uri": "sqlite:///unused.db", **kwargs}

    with pytest.raises(ConfigError, match=message):
        export_to_mlflow(_summary(), **arguments)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (
            "https://alice:pw@mlflow.example/x?token=abc&a=1",
            "https://alice:***@mlflow.example/x?token=***&a=1",
        ),
        ("postgresql+psycopg://u:p%40ss@db:5432/m", "postgresql+psycopg://u:***@db:5432/m"),
        ("https://TOKEN@mlflow.example", "https://***@mlflow.example"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("databricks", "databricks"),
        ("http://[::1", "<unparsable URI>"),
    ],
)
def test_masked_uri_hides_passwords_and_tokens(uri: str, shown: str) -> None:
    assert masked_uri(uri) == shown
