"""The models of the rollout scenario: a trained CNN and two INT8 variants, one of them broken.

The good variant is INT8 static calibrated on real training images. The bad one
is the same quantisation calibrated on the wrong data (images dimmed to 5 % of
their brightness: a pipeline bug that swapped in a preprocessed copy): its
activation ranges are far too narrow, so real inputs saturate and accuracy
collapses in the field. Both are real ONNX files that ONNX Runtime runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_runtime.quantize import Precision, build_variant, evaluate_onnx
from simulations.data import FashionMNIST

__all__ = ["BROKEN_CALIBRATION_BRIGHTNESS", "RolloutModels", "prepare_models"]

logger = logging.getLogger(__name__)

BROKEN_CALIBRATION_BRIGHTNESS = 0.05


@dataclass(frozen=True, slots=True)
class RolloutModels:
    """The three ONNX files and their accuracy on held-out images."""

    fp32: Path
    good_int8: Path
    bad_int8: Path
    accuracy: dict[str, float]


def _as_float(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return (images.astype(np.float32) / 255.0)[:, None]


def prepare_models(
    data: FashionMNIST,
    workdir: Path,
    *,
    train_examples: int = 6_000,
    epochs: int = 1,
    seed: int = 0,
) -> RolloutModels:
    """Train the CNN briefly on real data, export it and build both INT8 variants."""
    import torch

    from edge_runtime.export import export_onnx
    from edge_runtime.models import ModelName, build_model, images_to_tensor

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(ModelName.CNN, seed=seed)
    images = images_to_tensor(data.train.images[:train_examples])
    labels = torch.from_numpy(data.train.labels[:train_examples].astype(np.int64))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    model.eval()
    fp32 = workdir / "model-fp32.onnx"
    export_onnx(model, fp32, example=images[:8])
    calibration = _as_float(data.train.images[train_examples : train_examples + 256])
    good = build_variant(
        fp32, Precision.INT8_STATIC, workdir / "good-int8.onnx", calibration=calibration
    )
    bad = build_variant(
        fp32,
        Precision.INT8_STATIC,
        workdir / "bad-int8.onnx",
        calibration=calibration * BROKEN_CALIBRATION_BRIGHTNESS,
    )
    held_out = _as_float(data.test.images[:1000])
    held_labels = data.test.labels[:1000]
    accuracy = {
        name: evaluate_onnx(path, held_out, held_labels)[0]
        for name, path in (("fp32", fp32), ("good_int8", good), ("bad_int8", bad))
    }
    # What the broken pipeline published for it: it evaluated the FP32 file instead of
    # the variant, so the store's signed number looks fine and only the field can tell.
    accuracy["bad_int8_as_published"] = accuracy["fp32"]
    logger.info("rollout models: %s", accuracy)
    return RolloutModels(fp32=fp32, good_int8=good, bad_int8=bad, accuracy=accuracy)
