"""ONNX export with an output-parity check, and the reduced-precision variants."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import export as export_module
from edge_runtime.export import Exporter, ExportResult, export_onnx, load_onnx
from edge_runtime.models import ModelName, build_model
from edge_runtime.quantize import (
    Precision,
    build_variant,
    evaluate_onnx,
    rewrite_gemm_as_matmul_add,
    top1_agreement,
)
from fedge.errors import ConfigError, DataError

NUM_IMAGES = 256

# Size of each variant's file relative to the FP32 file (FashionCNN, 487 kB): the
# measured ratio sits inside each range. INT8 dynamic and INT4 keep the conv weights
# in FP32 (only MatMul/Gemm are quantised), so they shrink less than "8 or 4 bits"
# alone would say.
SIZE_RATIO = {
    Precision.FP16: (0.45, 0.60),  # measured 0.53
    Precision.INT8_DYNAMIC: (0.30, 0.45),  # measured 0.38
    Precision.INT8_STATIC: (0.25, 0.35),  # measured 0.31
    Precision.INT4_WEIGHT_ONLY: (0.20, 0.35),  # measured 0.30
}

# Top-1 agreement with FP32 on 256 uniform-noise images. The model is untrained, so
# its logits nearly tie (max gap of a few hundredths) and any rounding can flip the
# arg-max: this is a worst case, a trained model agrees far more. Measured: FP16 1.000,
# INT8 dynamic 0.996, INT8 static 0.988, INT4 0.895; the floors leave margin for a
# different CPU's kernels while still catching a broken variant (chance is 0.1).
AGREEMENT_FLOOR = {
    Precision.FP16: 0.98,
    Precision.INT8_DYNAMIC: 0.95,
    Precision.INT8_STATIC: 0.95,
    Precision.INT4_WEIGHT_ONLY: 0.80,
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ModelName.CNN, seed=0).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).random((NUM_IMAGES, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 10, size=NUM_IMAGES)


@pytest.fixture(scope="module")
def exported(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    example = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return export_onnx(model, tmp_path_factory.mktemp("fp32") / "model.onnx", example=example)


@pytest.fixture(scope="module")
def fp32_logits(exported: ExportResult, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    _, logits = evaluate_onnx(exported.path, images, labels)
    return logits


@pytest.fixture(scope="module")
def variants(
    exported: ExportResult, tmp_path_factory: pytest.TempPathFactory
) -> dict[Precision, Path]:
    directory = tmp_path_factory.mktemp("variants")
    calibration = np.random.default_rng(3).random((128, 1, 28, 28), dtype=np.float32)
    return {
        variant: build_variant(
            exported.path, variant, directory / f"{variant.value}.onnx", calibration=calibration
        )
        for variant in Precision
    }


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


# --- export -----------------------------------------------------------------------


def test_export_uses_dynamo_and_matches_torch(exported: ExportResult) -> None:
    assert exported.exporter is Exporter.DYNAMO
    assert exported.max_abs_diff <= 1e-4
    assert exported.size_bytes == exported.path.stat().st_size
    assert not list(exported.path.parent.glob("*.tmp"))


def test_exported_batch_dimension_is_dynamic(
    exported: ExportResult, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray
) -> None:
    _, logits = evaluate_onnx(exported.path, images[:37], labels[:37], batch_size=37)

    with torch.no_grad():
        expected = model(torch.from_numpy(images[:37])).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_export_strips_initializer_value_info(exported: ExportResult) -> None:
    graph = onnx.load(str(exported.path)).graph
    initializers = {initializer.name for initializer in graph.initializer}

    assert not [info.name for info in graph.value_info if info.name in initializers]


def test_export_ships_no_debug_metadata_or_build_paths(exported: ExportResult) -> None:
    model = onnx.load(str(exported.path))
    assert all(not node.metadata_props and not node.doc_string for node in model.graph.node)
    raw = exported.path.read_bytes()
    assert b"fl_client/models.py" not in raw and str(Path.cwd()).encode() not in raw


def test_export_falls_back_to_the_legacy_exporter(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> onnx.ModelProto:
        raise RuntimeError("dynamo unavailable")

    monkeypatch.setattr(export_module, "_export_dynamo", fail)

    result = export_onnx(model, tmp_path / "legacy.onnx", example=torch.rand(2, 1, 28, 28))

    assert result.exporter is Exporter.LEGACY
    assert result.max_abs_diff <= 1e-4


def test_export_refuses_a_graph_that_differs_from_torch(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        export_module, "_run_cpu", lambda serialised, example: np.zeros((2, 10)) + 1.0
    )
    target = tmp_path / "bad.onnx"

    with pytest.raises(ConfigError, match="differs from torch by"):
        export_onnx(model, target, example=torch.rand(2, 1, 28, 28))
    assert not target.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 12}, "opset must be at least 13"),
        ({"atol": 0.0}, "atol must be positive"),
        ({"example": torch.rand(2, 1, 28, 28, dtype=torch.float64)}, "example must be float32"),
        ({"example": torch.rand(0, 1, 28, 28)}, "non-empty batch dimension"),
    ],
)
def test_export_validates_its_arguments(
    model: torch.nn.Module, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"example": torch.rand(2, 1, 28, 28), **kwargs}

    with pytest.raises(ConfigError, match=message):
        export_onnx(model, tmp_path / "m.onnx", **arguments)  # type: ignore[arg-type]


# --- variants ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(Precision))
def test_variant_size_relative_to_fp32(
    variant: Precision, variants: dict[Precision, Path], exported: ExportResult
) -> None:
    low, high = SIZE_RATIO[variant]

    ratio = variants[variant].stat().st_size / exported.size_bytes

    assert low <= ratio <= high, f"{variant.value}: {ratio:.3f}"


@pytest.mark.parametrize("variant", list(Precision))
def test_variant_agrees_with_fp32(
    variant: Precision,
    variants: dict[Precision, Path],
    fp32_logits: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
) -> None:
    _, logits = evaluate_onnx(variants[variant], images, labels, batch_size=100)

    assert logits.shape == fp32_logits.shape
    assert logits.dtype == np.float32
    assert top1_agreement(fp32_logits, logits) >= AGREEMENT_FLOOR[variant]


def test_fp16_keeps_float32_inputs_and_outputs(variants: dict[Precision, Path]) -> None:
    session = ort.InferenceSession(
        str(variants[Precision.FP16]), providers=["CPUExecutionProvider"]
    )

    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_outputs()[0].type == "tensor(float)"
    assert session.get_inputs()[0].shape[0] not in (1, 8)  # the batch stays symbolic


def test_int8_static_is_qdq(variants: dict[Precision, Path]) -> None:
    ops = _op_types(variants[Precision.INT8_STATIC])

    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_dynamic_leaves_convolutions_in_float(variants: dict[Precision, Path]) -> None:
    ops = _op_types(variants[Precision.INT8_DYNAMIC])

    assert "MatMulInteger" in ops
    assert "ConvInteger" not in ops
    assert "Conv" in ops


def test_int4_uses_matmul_nbits_for_every_linear_layer(variants: dict[Precision, Path]) -> None:
    nodes = onnx.load(str(variants[Precision.INT4_WEIGHT_ONLY])).graph.node

    assert sum(node.op_type == "MatMulNBits" for node in nodes) == 2
    assert not [node for node in nodes if node.op_type in ("Gemm", "MatMul")]


def test_building_int4_adds_no_logging_handler(exported: ExportResult, tmp_path: Path) -> None:
    before = list(logging.getLogger().handlers)

    build_variant(exported.path, Precision.INT4_WEIGHT_ONLY, tmp_path / "int4.onnx")

    assert logging.getLogger().handlers == before


def test_int8_static_needs_calibration(exported: ExportResult, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a non-empty calibration array"):
        build_variant(exported.path, Precision.INT8_STATIC, tmp_path / "int8.onnx")


def test_build_variant_rejects_an_unknown_variant(exported: ExportResult, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown variant 'fp16'"):
        build_variant(exported.path, "fp16", tmp_path / "x.onnx")  # type: ignore[arg-type]


def test_build_variant_refuses_to_overwrite_its_input(exported: ExportResult) -> None:
    with pytest.raises(ConfigError, match="must differ from fp32_path"):
        build_variant(exported.path, Precision.FP16, exported.path)


def test_gemm_rewrite_preserves_alpha_beta_and_transposes() -> None:
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((3, 5)).astype(np.float32)  # (N, K), used with transB
    bias = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=2.0, beta=0.5, transA=1, transB=1)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((5, 4)).astype(np.float32)

    assert rewrite_gemm_as_matmul_add(model) == 1

    onnx.checker.check_model(model)
    assert {node.op_type for node in model.graph.node} == {"Transpose", "MatMul", "Add"}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, 2.0 * x.T @ weight.T + 0.5 * bias, rtol=1e-5, atol=1e-5)


# --- corrupt input and evaluation helpers -----------------------------------------


def test_garbage_onnx_file_is_a_clear_data_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model\xff" * 10)

    with pytest.raises(DataError, match="is not a valid ONNX model"):
        build_variant(garbage, Precision.FP16, tmp_path / "out.onnx")
    with pytest.raises(DataError, match="ONNX Runtime cannot load"):
        evaluate_onnx(garbage, np.zeros((1, 1, 28, 28), np.float32), np.zeros(1))


def test_truncated_onnx_file_is_a_clear_data_error(exported: ExportResult, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.path.read_bytes()[: exported.size_bytes // 2])

    with pytest.raises(DataError, match="is not a valid ONNX model"):
        load_onnx(truncated)


def test_missing_onnx_file_is_a_clear_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_variant(tmp_path / "absent.onnx", Precision.FP16, tmp_path / "out.onnx")
    with pytest.raises(DataError, match="does not exist"):
        evaluate_onnx(tmp_path / "absent.onnx", np.zeros((1, 1, 28, 28), np.float32), np.zeros(1))


def test_evaluate_onnx_reports_accuracy(exported: ExportResult, images: np.ndarray) -> None:
    _, logits = evaluate_onnx(exported.path, images, np.zeros(NUM_IMAGES))
    predicted = logits.argmax(axis=1)

    accuracy, _ = evaluate_onnx(exported.path, images, predicted)

    assert accuracy == 1.0


@pytest.mark.parametrize(
    ("count", "num_labels", "batch_size", "message"),
    [
        (2, 3, 256, "need as many labels as images"),
        (0, 0, 256, "need as many labels as images"),
        (2, 2, 0, "batch_size must be at least 1"),
    ],
)
def test_evaluate_onnx_validates_its_arguments(
    exported: ExportResult, count: int, num_labels: int, batch_size: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate_onnx(
            exported.path,
            np.zeros((count, 1, 28, 28), np.float32),
            np.zeros(num_labels),
            batch_size=batch_size,
        )


def test_top1_agreement_counts_matching_arg_maxes() -> None:
    a = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = np.array([[0.0, 2.0], [0.0, 1.0], [0.0, 1.0], [3.0, 0.0]])

    assert top1_agreement(a, b) == 0.75


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (np.zeros((2, 3)), np.zeros((3, 3))),
        (np.zeros(3), np.zeros(3)),
        (np.zeros((0, 3)), np.zeros((0, 3))),
    ],
)
def test_top1_agreement_rejects_mismatched_arrays(a: np.ndarray, b: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="need two non-empty"):
        top1_agreement(a, b)
