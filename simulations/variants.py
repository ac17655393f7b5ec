"""Build a global model's ONNX variants, measure them, and hand them to the model store.

For a checkpoint: export ONNX FP32 (the reference, parity-checked against
torch), then FP16, INT8 static (calibrated on training images), INT8 dynamic
and INT4 weight-only; each is measured on held-out images (accuracy, top-1
agreement with FP32, size, batch-1 median latency on ONNX Runtime's CPU
provider). A variant whose accuracy falls more than its floor below FP32's is
published as ``rejected``: recorded, never offered to devices.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from edge_runtime import Precision, build_variant, evaluate_onnx, export_onnx, top1_agreement
from edge_runtime.drift_reference import REFERENCE_ARTEFACT_NAME, ReferenceStats
from edge_runtime.latency import time_session_runs
from edge_runtime.manifest import ArtefactFormat
from edge_runtime.manifest import Precision as StorePrecision
from edge_runtime.models import ModelName, build_model
from fl_client.training import images_to_tensor
from fl_server.checkpoints import load_weights
from fl_server.store.store import NewArtefact

__all__ = ["VariantPolicy", "build_model_variants"]

_STORE_PRECISION = {
    Precision.FP16: StorePrecision.FP16,
    Precision.INT8_STATIC: StorePrecision.INT8,
    Precision.INT8_DYNAMIC: StorePrecision.INT8,
    Precision.INT4_WEIGHT_ONLY: StorePrecision.INT4,
}
_NAMES = {
    Precision.FP16: "model-fp16.onnx",
    Precision.INT8_STATIC: "model-int8-static.onnx",
    Precision.INT8_DYNAMIC: "model-int8-dynamic.onnx",
    Precision.INT4_WEIGHT_ONLY: "model-int4.onnx",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class VariantPolicy:
    """Which variants to build and how much accuracy each may lose against FP32 (points/100)."""

    max_drop: dict[Precision, float] = field(
        default_factory=lambda: {
            Precision.FP16: 0.005,
            Precision.INT8_STATIC: 0.01,
            Precision.INT8_DYNAMIC: 0.01,
            Precision.INT4_WEIGHT_ONLY: 0.03,
        }
    )
    calibration_examples: int = 256
    drift_sample_size: int = 500
    latency_runs: int = 30


def _latency_ms(path: Path, image: npt.NDArray[np.float32], runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return round(statistics.median(time_session_runs(session, image, runs)) * 1000, 4)


def build_model_variants(
    checkpoint: Path,
    *,
    sha256: str,
    model: ModelName,
    held_out: tuple[npt.NDArray[np.uint8], npt.NDArray[np.integer]],
    calibration: npt.NDArray[np.uint8],  # training images: calibration and drift reference
    policy: VariantPolicy | None = None,
) -> list[NewArtefact]:
    """Return the FP32 ONNX reference and every variant of ``checkpoint``, measured.

    Raises
    ------
    StorageError
        If the checkpoint is missing or its digest differs.
    ConfigError
        If the export does not match torch.
    """
    policy = policy or VariantPolicy()
    network = build_model(model)
    weights = load_weights(checkpoint, expected_sha256=sha256)
    network.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    network.eval()
    images, labels = held_out
    inputs = images_to_tensor(images).numpy()
    training_inputs = images_to_tensor(calibration).numpy()  # calibration and drift reference
    calibration_inputs = training_inputs[: policy.calibration_examples]
    one = inputs[:1]
    artefacts: list[NewArtefact] = []
    with tempfile.TemporaryDirectory(prefix="fedge-variants-") as tmp:
        work = Path(tmp)
        reference = work / "model-fp32.onnx"
        export_onnx(network, reference, example=torch.from_numpy(inputs[:8]))
        fp32_accuracy, fp32_logits = evaluate_onnx(reference, inputs, labels)
        artefacts.append(
            NewArtefact(
                name="model-fp32.onnx",
                data=reference.read_bytes(),
                format=ArtefactFormat.ONNX,
                precision=StorePrecision.FP32,
                quality={
                    "accuracy": fp32_accuracy,
                    "agreement": 1.0,
                    "size_bytes": float(reference.stat().st_size),
                    "p50_ms": _latency_ms(reference, one, policy.latency_runs),
                },
            )
        )
        for variant, max_drop in policy.max_drop.items():
            path = build_variant(
                reference, variant, work / _NAMES[variant], calibration=calibration_inputs
            )
            accuracy, logits = evaluate_onnx(path, inputs, labels)
            artefacts.append(
                NewArtefact(
                    name=_NAMES[variant],
                    data=path.read_bytes(),
                    format=ArtefactFormat.ONNX,
                    precision=_STORE_PRECISION[variant],
                    quality={
                        "accuracy": accuracy,
                        "agreement": top1_agreement(fp32_logits, logits),
                        "size_bytes": float(path.stat().st_size),
                        "p50_ms": _latency_ms(path, one, policy.latency_runs),
                        "max_drop": max_drop,
                    },
                    rejected=accuracy < fp32_accuracy - max_drop,
                )
            )
    artefacts.append(_drift_reference(training_inputs, policy))
    return artefacts


def _drift_reference(inputs: npt.NDArray[np.float32], policy: VariantPolicy) -> NewArtefact:
    """Return the reference statistics devices test their inputs against (drift)."""
    reference = ReferenceStats.fit(
        inputs,
        sample_size=min(len(inputs), policy.drift_sample_size),
        rng=np.random.default_rng(0),  # which reference images are kept: not a secret
    )
    data = reference.canonical_bytes()
    return NewArtefact(
        name=REFERENCE_ARTEFACT_NAME,
        data=data,
        format=ArtefactFormat.JSON,
        precision=StorePrecision.FP32,
        quality={"size_bytes": float(len(data)), "reference_inputs": float(len(inputs))},
    )
