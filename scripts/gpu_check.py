"""One prepared GPU check: a CUDA local-training step through fl_client, ORT's CUDA provider.

Run on a machine with an NVIDIA GPU (never in CI)::

    python scripts/gpu_check.py --out "$OUT/gpu_check.json"

It reports, side by side with the CPU on the same machine:

- ``training``: one epoch of ``fl_client.training.train`` on 4,096 generated
  28x28 images (FashionCNN, batch 64) on the device ``fl_client.device.select_device``
  picks, its mean loss and time, and the largest weight difference to the CPU run;
- ``onnxruntime``: the providers this onnxruntime build offers, the provider a
  CUDA session *really* runs on (``session.get_providers()``; ORT falls back to the
  CPU silently), batch-1 p50 and batch-64 throughput on each;
- ``tensorrt``: whether the optional ``tensorrt`` package imports.

Every step records its error instead of stopping the script, so one run says
everything the machine can do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime.export import export_onnx
from edge_runtime.latency import time_session_runs
from edge_runtime.models import ModelName, build_model
from fl_client.device import DeviceKind, select_device
from fl_client.training import TrainConfig, train


def _guarded(step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return step()
    except Exception as exc:  # the report says what failed and goes on
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}


def _data(count: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)  # benchmark inputs only
    labels = generator.integers(0, 10, size=count)
    images = generator.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label : 4 + 2 * label, :] = 250
    return images, labels


def _training() -> dict[str, Any]:
    images, labels = _data()
    config = TrainConfig(batch_size=64, learning_rate=0.05)
    runs: dict[str, Any] = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for name, kind in (("cpu", DeviceKind.CPU), ("auto", DeviceKind.AUTO)):
        choice = select_device(kind)
        model = build_model(ModelName.CNN, seed=1)
        # Warm-up on every device (CUDA context, kernels, allocator) before timing.
        train(
            build_model(ModelName.CNN, seed=1),
            images[:256],
            labels[:256],
            config,
            generator=torch.Generator().manual_seed(0),
            device=choice.device,
        )
        if choice.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = train(
            model,
            images,
            labels,
            config,
            generator=torch.Generator().manual_seed(0),
            device=choice.device,
        )
        seconds = time.perf_counter() - started
        weights[name] = model.state_dict()
        runs[name] = {
            "device": str(choice.device),
            "reason": choice.reason,
            "seconds": round(seconds, 3),
            "mean_loss": round(result.mean_loss, 5),
        }
    runs["max_weight_diff_auto_vs_cpu"] = max(
        float((weights["cpu"][k] - weights["auto"][k]).abs().max()) for k in weights["cpu"]
    )
    runs["speedup_auto_over_cpu"] = round(runs["cpu"]["seconds"] / runs["auto"]["seconds"], 2)
    return runs


def _latency(session: Any, batch: np.ndarray, runs: int) -> float:
    return statistics.median(time_session_runs(session, batch, runs))


def _onnxruntime() -> dict[str, Any]:
    import onnxruntime as ort

    report: dict[str, Any] = {
        "version": ort.__version__,
        "available": ort.get_available_providers(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.onnx"
        model = build_model(ModelName.CNN, seed=1).eval()
        export_onnx(model, path, example=torch.rand(8, 1, 28, 28))
        one = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
        many = np.random.default_rng(2).random((64, 1, 28, 28), dtype=np.float32)
        for label, providers in (
            ("cpu", ["CPUExecutionProvider"]),
            ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
            (
                "tensorrt",
                ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            ),
        ):

            def measure(providers: list[str] = providers) -> dict[str, Any]:
                session = ort.InferenceSession(str(path), providers=providers)
                return {
                    "requested": providers[0],
                    "active": session.get_providers()[0],
                    "p50_ms_b1": round(_latency(session, one, 200) * 1e3, 4),
                    "throughput_b64": round(64 / _latency(session, many, 50), 1),
                }

            report[label] = _guarded(measure)
    return report


def main() -> None:
    """Run every check and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    document = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "training": _guarded(_training),
        "onnxruntime": _guarded(_onnxruntime),
        "tensorrt": {"importable": importlib.util.find_spec("tensorrt") is not None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
