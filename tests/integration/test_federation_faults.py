"""A round in which a client fails still completes, is counted and updates the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fl_server import RoundReport
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from simulations.config import SimConfig
from simulations.provider import DatasetPartitions
from simulations.run import PreparedData, RunPaths, new_run_id, prepare_data, run_federation
from tests.conftest import make_synthetic_fashion

pytestmark = pytest.mark.slow


@dataclass(frozen=True, slots=True)
class _FailingFirstClient:
    inner: DatasetPartitions

    def __call__(self, partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
        if partition_id == 0:
            raise RuntimeError("simulated device failure")
        return self.inner(partition_id, num_partitions)


class _Collect:
    def __init__(self) -> None:
        self.reports: list[RoundReport] = []

    def on_round(self, report: RoundReport) -> None:
        self.reports.append(report)


def test_a_failing_client_is_counted_and_the_round_still_updates(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=300, test=100)
    config = SimConfig(num_clients=3, num_rounds=2, data_dir=data, parallelism=2)
    prepared = prepare_data(config)
    failing = PreparedData(
        provider=_FailingFirstClient(prepared.provider),  # type: ignore[arg-type]
        test=prepared.test,
        stats=prepared.stats,
    )
    paths = RunPaths(
        summary=tmp_path / "summary.json",
        models=tmp_path / "models",
        db_url=f"sqlite:///{tmp_path / 'fedge.db'}",
    )
    collect = _Collect()

    summary = run_federation(
        config, paths, run_id=new_run_id(), prepared=failing, observers=[collect]
    )

    assert summary.status == "completed"
    assert [(r["replies"], r["failures"]) for r in summary.rounds] == [(2, 1), (2, 1)]
    digests = [report.model_sha256 for report in collect.reports]
    assert len(set(digests)) == 3, "each round must still produce a new global model"
    engine = open_database(paths.db_url)
    try:
        events = [e for e in AuditLog(engine).iter() if e.kind is AuditEventKind.ROUND_COMPLETED]
    finally:
        engine.dispose()
    assert [e.payload["failures"] for e in events] == [1, 1]
