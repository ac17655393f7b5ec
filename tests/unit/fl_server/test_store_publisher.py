"""RoundPublisher: every round becomes a version; variants only on the rounds asked for."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import Engine

from edge_runtime.manifest import ArtefactFormat, Precision
from fl_server.federation import RoundReport
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.publisher import RoundPublisher
from fl_server.store.store import ModelStore, NewArtefact


def _report(tmp_path: Path, server_round: int) -> RoundReport:
    path = tmp_path / f"round-{server_round}.npz"
    path.write_bytes(f"weights of round {server_round}".encode())
    return RoundReport(
        server_round=server_round,
        loss=1.0 / (server_round + 1),
        accuracy=0.1 * server_round,
        seconds=0.1,
        num_replies=3,
        num_failures=0,
        model_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        model_path=str(path),
    )


def _variant(report: RoundReport) -> list[NewArtefact]:
    return [
        NewArtefact(
            name="model-int8-static.onnx",
            data=f"int8 of round {report.server_round}".encode(),
            format=ArtefactFormat.ONNX,
            precision=Precision.INT8,
            quality={"accuracy": 0.5},
        )
    ]


@pytest.mark.parametrize(
    ("variant_rounds", "expected"), [((3,), [3]), (range(1, 4), [1, 2, 3]), ((), [])]
)
def test_variants_are_built_for_the_requested_rounds_only(
    engine: Engine, tmp_path: Path, variant_rounds: tuple[int, ...], expected: list[int]
) -> None:
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate())
    built: list[int] = []

    def variants(report: RoundReport) -> list[NewArtefact]:
        built.append(report.server_round)
        return _variant(report)

    publisher = RoundPublisher(
        store, model="cnn", run_id="run-1", variants=variants, variant_rounds=variant_rounds
    )
    for server_round in range(4):
        publisher.on_round(_report(tmp_path, server_round))

    assert built == expected
    assert publisher.versions == {0: 1, 1: 2, 2: 3, 3: 4}
    for server_round, version in publisher.versions.items():
        stored = store.get("cnn", version)
        names = {a.name for a in stored.manifest.artefacts}
        has_variant = "model-int8-static.onnx" in names
        assert has_variant is (server_round in expected)
        assert stored.manifest.parent == (None if version == 1 else version - 1)
        assert stored.manifest.metadata["server_round"] == server_round
