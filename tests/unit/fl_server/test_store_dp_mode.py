"""The DP mode in a version's signed metadata: published, read back, unknown in old manifests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedge.errors import ConfigError
from fl_server.coordinator import PrivacyPlan, RunPlan
from fl_server.db import open_database
from fl_server.federation import Evaluation, FederationConfig, RoundReport
from fl_server.privacy import PrivacyMechanism
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.publisher import RoundPublisher
from fl_server.store.store import ModelStore, VersionInfo
from strategies.dp_mode import DpMode


def _report(tmp_path: Path, server_round: int) -> RoundReport:
    path = tmp_path / f"round-{server_round}.npz"
    path.write_bytes(f"weights of round {server_round}".encode())
    return RoundReport(
        server_round=server_round,
        loss=0.5,
        accuracy=0.75,
        seconds=0.1,
        num_replies=3,
        num_failures=0,
        model_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        model_path=str(path),
    )


@pytest.mark.parametrize("mode", [DpMode.OFF, DpMode.CENTRAL, DpMode.SAMPLE, None])
def test_the_publisher_signs_the_runs_dp_mode_into_every_version(
    tmp_path: Path, mode: DpMode | None
) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
    try:
        store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate())
        publisher = RoundPublisher(
            store, model="cnn-private", run_id="run-1", dp_mode=mode, privacy=lambda: (1.5, 1e-5)
        )
        publisher.on_round(_report(tmp_path, 1))
        metadata = store.get("cnn-private", 1).manifest.metadata
    finally:
        engine.dispose()

    assert metadata["dp_mode"] == (None if mode is None else mode.value)
    info = VersionInfo.from_metadata(metadata)
    assert (info.run_id, info.server_round, info.dp_mode) == ("run-1", 1, mode)
    assert (info.dp_epsilon, info.accuracy) == (1.5, 0.75)


def test_an_old_manifest_without_the_key_reads_as_unknown() -> None:
    info = VersionInfo.from_metadata({"run_id": "r", "server_round": 2, "metrics": {"loss": 1}})

    assert info.dp_mode is None
    assert info.differentially_private is None
    assert info.accuracy is None
    assert info.metrics == {"loss": 1.0}


@pytest.mark.parametrize(
    ("metadata", "private"),
    [
        ({"dp_mode": "off"}, False),
        ({"dp_mode": "off", "dp_epsilon": 1.0}, True),
        ({"dp_mode": "sample"}, True),
        ({"dp_epsilon": 2}, True),
        ({"dp_mode": "a mode of a newer fedge"}, None),
        ({"dp_mode": 3, "server_round": True, "metrics": [1]}, None),
    ],
)
def test_whether_a_version_is_private(metadata: dict[str, object], private: bool | None) -> None:
    assert VersionInfo.from_metadata(metadata).differentially_private is private


def test_version_info_writes_the_mode_by_value() -> None:
    assert VersionInfo(dp_mode=DpMode.DISTRIBUTED).to_json()["dp_mode"] == "distributed"
    assert VersionInfo().to_json()["dp_mode"] is None


def _plan(privacy: PrivacyPlan | None, *, model_name: str = "cnn") -> RunPlan:
    def evaluate(arrays: ArrayRecord) -> Evaluation:
        raise AssertionError("never called")

    return RunPlan(
        run_id="run-1",
        model_name=model_name,
        federation=FederationConfig(num_rounds=1),
        initial_arrays=ArrayRecord(),
        train_config=ConfigRecord(),
        evaluate=evaluate,
        config_json={},
        data_stats={},
        privacy=privacy,
    )


@pytest.mark.parametrize("mode", [m for m in DpMode if m is not DpMode.OFF])
def test_a_run_plan_knows_its_dp_mode_from_its_privacy_plan(mode: DpMode) -> None:
    privacy = PrivacyPlan(mechanism=PrivacyMechanism.of(mode), epsilon=None, delta=1e-5)

    assert _plan(privacy).dp_mode is mode
    assert _plan(None).dp_mode is DpMode.OFF


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 65, "cnn private"])
def test_a_run_plan_refuses_a_name_the_store_cannot_publish(name: str) -> None:
    with pytest.raises(ConfigError, match=r"model name must match \[A-Za-z0-9_.-\]\{1,64\}"):
        _plan(None, model_name=name)
