"""The final model's ONNX variants: measured, and rejected below their accuracy floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime import Precision
from edge_runtime.drift import DriftConfig, DriftDetector
from edge_runtime.drift_reference import ReferenceStats
from edge_runtime.manifest import ArtefactFormat
from edge_runtime.models import ModelName, build_model
from fl_server.checkpoints import CheckpointDir
from simulations.variants import VariantPolicy, build_model_variants


def _checkpoint(tmp_path: Path) -> tuple[Path, str]:
    model = build_model(ModelName.CNN, seed=3)
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    saved = CheckpointDir(tmp_path).save(1, weights)
    return saved.path, saved.sha256


def test_every_variant_is_measured_and_a_missed_floor_is_rejected(tmp_path: Path) -> None:
    path, sha256 = _checkpoint(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=200)
    # A negative floor no quantised variant can meet (it would have to beat FP32 by 100 %).
    policy = VariantPolicy(
        max_drop={Precision.FP16: 0.5, Precision.INT4_WEIGHT_ONLY: -1.0}, latency_runs=3
    )

    artefacts = build_model_variants(
        path,
        sha256=sha256,
        model=ModelName.CNN,
        held_out=(images, labels),
        calibration=images,
        policy=policy,
    )

    by_name = {a.name: a for a in artefacts}
    reference = by_name.pop("drift-reference.json")
    assert set(by_name) == {"model-fp32.onnx", "model-fp16.onnx", "model-int4.onnx"}
    assert all(a.format is ArtefactFormat.ONNX for a in by_name.values())
    # The drift reference ships with the model and reads back; the same images do not drift.
    assert reference.format is ArtefactFormat.JSON and isinstance(reference.data, bytes)
    stats = ReferenceStats.from_bytes(reference.data)
    assert (
        not DriftDetector(stats, DriftConfig(window=100))
        .evaluate(images[:100, None].astype(np.float32) / 255)
        .drifted
    )
    assert not by_name["model-fp32.onnx"].rejected and not by_name["model-fp16.onnx"].rejected
    assert by_name["model-int4.onnx"].rejected
    fp16 = by_name["model-fp16.onnx"].quality
    assert fp16["agreement"] >= 0.95
    assert fp16["size_bytes"] < 0.6 * by_name["model-fp32.onnx"].quality["size_bytes"]
    assert all(a.quality["p50_ms"] > 0 for a in by_name.values())
