"""``fedge client`` and ``fedge edge``: sideload a signed bundle, infer, roll back, benchmark."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.drift_reference import REFERENCE_ARTEFACT_NAME, ReferenceStats
from edge_runtime.export import export_onnx
from edge_runtime.manifest import ArtefactFormat
from edge_runtime.models import ModelName, build_model
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact
from tests.unit.fedge.test_cli import _assert_one_clear_line, _fedge


def _images(count: int, seed: int, brightness: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, size=(count, 28, 28)).astype(np.int16)
    return np.clip(images + round(brightness * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of a CNN in a store, each exported as a signed bundle."""
    root = tmp_path_factory.mktemp("client-cli")
    store_dir = root / "store"
    engine = open_database(f"sqlite:///{root / 'fedge.db'}")
    key = StoreKey.load_or_create(store_dir / "store-key.pem")
    (root / "store.pub").write_text(key.public_key_bytes().hex() + "\n")
    reference = ReferenceStats.fit(
        _images(400, 0).astype(np.float32)[:, None] / 255, sample_size=300
    ).canonical_bytes()
    try:
        store = ModelStore(engine, FileBlobStore(store_dir), key)
        for version in (1, 2):
            onnx_path = root / f"v{version}.onnx"
            export_onnx(
                build_model(ModelName.CNN, seed=version).eval(),
                onnx_path,
                example=torch.rand(4, 1, 28, 28),
            )
            signed = store.publish(
                "cnn",
                [
                    NewArtefact(name="model-fp32.onnx", data=onnx_path, format=ArtefactFormat.ONNX),
                    NewArtefact(
                        name=REFERENCE_ARTEFACT_NAME, data=reference, format=ArtefactFormat.JSON
                    ),
                ],
            ).signed
            bundle = root / f"bundle-{version}"
            bundle.mkdir()
            shutil.copy(onnx_path, bundle / "model-fp32.onnx")
            (bundle / REFERENCE_ARTEFACT_NAME).write_bytes(reference)
            (bundle / "manifest.json").write_text(json.dumps(signed.to_json()))
    finally:
        engine.dispose()
    np.savez(root / "same.npz", images=_images(300, 1), labels=np.arange(300) % 10)
    np.savez(root / "shifted.npz", images=_images(300, 2, brightness=0.3))
    return {"root": root, "key": root / "store.pub"}


def test_install_infer_list_and_roll_back(published: dict[str, Path], tmp_path: Path) -> None:
    root, key = published["root"], published["key"]
    env = {"FEDGE_CACHE_DIR": str(tmp_path / "cache"), "FEDGE_STORE_KEY": str(key)}

    for version in (1, 2):
        installed = _fedge("client", "models", "install", str(root / f"bundle-{version}"), env=env)
        assert installed.returncode == 0, installed.stderr
        assert f"installed cnn v{version} model-fp32.onnx" in installed.stdout
    listed = _fedge("client", "models", "list", env=env)
    assert listed.stdout.splitlines()[1].split() == [
        "cnn",
        "v2",
        "model-fp32.onnx",
        "fp32",
        "v1,",
        "v2",
    ]

    same = _fedge("client", "infer", "cnn", "--input", str(root / "same.npz"), env=env)
    assert same.returncode == 0, same.stderr
    assert "cnn v2 model-fp32.onnx on CPUExecutionProvider" in same.stdout
    assert re.search(r"p50 [0-9.]+ ms, p95 [0-9.]+ ms, p99 [0-9.]+ ms", same.stdout)
    assert "accuracy" in same.stdout and "drift: no drift over the last 300 inputs" in same.stdout
    shifted = _fedge("client", "infer", "cnn", "--input", str(root / "shifted.npz"), env=env)
    assert "drift: DRIFT over the last 300 inputs" in shifted.stdout, shifted.stdout
    assert "accuracy" not in shifted.stdout  # no labels given

    rolled = _fedge("client", "models", "rollback", "cnn", env=env)
    assert rolled.stdout.strip() == "cnn -> v1 model-fp32.onnx"
    _assert_one_clear_line(
        _fedge(
            "client",
            "infer",
            "cnn",
            "--input",
            str(root / "same.npz"),
            "--provider",
            "cuda",
            env=env,
        ),
        "CUDAExecutionProvider",
    )


def test_a_tampered_or_unsigned_bundle_changes_nothing(
    published: dict[str, Path], tmp_path: Path
) -> None:
    root, key = published["root"], published["key"]
    env = {"FEDGE_CACHE_DIR": str(tmp_path / "cache"), "FEDGE_STORE_KEY": str(key)}
    assert _fedge("client", "models", "install", str(root / "bundle-1"), env=env).returncode == 0
    tampered = tmp_path / "tampered"
    shutil.copytree(root / "bundle-2", tampered)
    model = tampered / "model-fp32.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")

    _assert_one_clear_line(
        _fedge("client", "models", "install", str(tampered), env=env), "hashes to|signed manifest"
    )
    other_key = {**env, "FEDGE_STORE_KEY": "ab" * 32}
    _assert_one_clear_line(
        _fedge("client", "models", "install", str(root / "bundle-2"), env=other_key),
        "signed by key|does not verify",
    )
    _assert_one_clear_line(
        _fedge("client", "models", "install", str(tmp_path), env=env), "no manifest.json"
    )
    _assert_one_clear_line(
        _fedge("client", "models", "list", env={**env, "FEDGE_STORE_KEY": "nothex"}),
        "--store-key must be 64 hex digits",
    )
    listed = _fedge("client", "models", "list", env=env)
    assert listed.stdout.splitlines()[1].split()[:2] == ["cnn", "v1"]  # the previous stays


def test_edge_bench_reports_the_provider_that_really_ran(published: dict[str, Path]) -> None:
    result = _fedge("edge", "bench", str(published["root"] / "v1.onnx"), "--runs", "20", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["providers"]
    assert [r["provider"] for r in rows] == ["CPUExecutionProvider"]
    assert all(r["p50_ms"] > 0 and r["throughput_b64"] > 0 for r in rows)
    _assert_one_clear_line(_fedge("edge", "bench", "/nonexistent.onnx"), "nonexistent")


def test_client_ledger_shows_each_devices_lifetime_spend_and_refusals(tmp_path: Path) -> None:
    from fl_client.budget import ClientLedger, ClientSpend
    from strategies.accounting import GaussianSteps

    devices = tmp_path / "devices"
    spend = ClientSpend(
        mechanism="central-gaussian",
        gaussian=GaussianSteps(noise_multiplier=2.0, sample_rate=1.0, steps=1),
    )
    for number in (1, 2):  # two rounds, in two runs: one lifetime ledger
        ClientLedger(devices / "device-7.jsonl").record(number, spend)
    (devices / "refusals-7.jsonl").write_text(
        json.dumps({"at": "t", "source": "privacy budget", "reason": "over its budget 3"}) + "\n"
    )

    shown = _fedge("client", "ledger", "--devices-dir", str(devices))
    missing = _fedge("client", "ledger", "--devices-dir", str(tmp_path / "none"))
    bad = _fedge("client", "ledger", "--devices-dir", str(devices), "--accountant", "gdp")

    assert shown.returncode == 0, shown.stderr
    assert re.match(
        r"device 7: 2 rounds, lifetime epsilon \d+\.\d{3} at delta 1e-05; 1 refused, "
        r"last: over its budget 3",
        shown.stdout,
    )
    _assert_one_clear_line(missing, "no device ledgers: .*none does not exist")
    assert not (tmp_path / "none").exists()  # read-only: nothing created
    _assert_one_clear_line(bad, "--accountant must be rdp or prv")
