"""Build smaller variants of an FP32 ONNX model and measure how much they still agree.

Each :class:`Precision` variant is built from an FP32 file written by
:func:`edge_runtime.export.export_onnx` (any valid FP32 ONNX classifier with one
float input works) by one builder in ``_BUILDERS``.

Notes
-----
Measured trade-offs on ONNX Runtime's CPU provider (see FIELD-NOTES):

- FP16 halves the file but computes in FP32 behind inserted Casts: never faster.
- INT8 static (QDQ, per-channel int8 weights, uint8 activations, Conv/Gemm/MatMul only)
  is about a quarter of the size; 3-4x faster on linear-heavy models, but on a tiny
  GroupNorm CNN the quantise/dequantise around the norms costs more than it saves.
- INT8 dynamic turns convolutions into ConvInteger, which runs about 6x *slower*,
  so only MatMul and Gemm are quantised here; it suits linear-heavy models.
- INT4 weight-only (MatMulNBits) quantises only MatMul; the quantiser skips Gemm, so
  each Gemm with constant weights is first rewritten as MatMul + Add.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

from edge_runtime.export import load_onnx, strip_initializer_value_info, write_onnx_atomically
from fedge.errors import ConfigError, DataError

__all__ = [
    "ArrayCalibrationReader",
    "Precision",
    "build_variant",
    "evaluate_onnx",
    "rewrite_gemm_as_matmul_add",
    "top1_agreement",
]

logger = logging.getLogger(__name__)

_INT4_BLOCK_SIZE = 32
_CALIBRATION_BATCH = 64


class Precision(Enum):
    """The reduced-precision variants :func:`build_variant` can write."""

    FP16 = "fp16"
    INT8_DYNAMIC = "int8-dynamic"
    INT8_STATIC = "int8-static"
    INT4_WEIGHT_ONLY = "int4-weight-only"


class ArrayCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """Feed a numpy array of calibration inputs to ``quantize_static`` in batches."""

    def __init__(self, input_name: str, samples: np.ndarray, batch_size: int = _CALIBRATION_BATCH):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self._input_name = input_name
        self._samples = np.ascontiguousarray(samples, dtype=np.float32)
        self._batch_size = batch_size
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Return the next batch, or None when the array is exhausted."""
        if self._position >= len(self._samples):
            return None
        batch = self._samples[self._position : self._position + self._batch_size]
        self._position += self._batch_size
        return {self._input_name: batch}

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._position = 0


def _input_name(model: onnx.ModelProto) -> str:
    initializer_names = {initializer.name for initializer in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializer_names]
    if len(inputs) != 1:
        raise ConfigError(f"expected a model with one input, found {inputs}")
    return str(inputs[0])


def rewrite_gemm_as_matmul_add(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each Gemm with a constant ``B`` as MatMul (+ Add).

    ``alpha`` is folded into ``B`` and ``beta`` into a constant ``C``; ``transB`` is
    applied to the stored weight; ``transA`` becomes a Transpose node. A Gemm whose
    ``B`` (or non-unit-``beta`` ``C``) is not an initializer is left alone.

    Returns
    -------
    int
        How many Gemm nodes were rewritten.
    """
    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in model.graph.node:
        attributes = {
            attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute
        }
        alpha = float(attributes.get("alpha", 1.0))
        beta = float(attributes.get("beta", 1.0))
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if (
            node.op_type != "Gemm"
            or node.input[1] not in initializers
            or (bias_name and beta != 1.0 and bias_name not in initializers)
        ):
            new_nodes.append(node)
            continue
        name = node.name or f"gemm_{rewritten}"
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attributes.get("transB", 0):
            weight = weight.T
        weight = np.ascontiguousarray(weight * np.asarray(alpha, dtype=weight.dtype))
        weight_name = f"{name}_matmul_weight"
        model.graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        activation = node.input[0]
        if attributes.get("transA", 0):
            transposed = f"{name}_input_transposed"
            new_nodes.append(
                helper.make_node(
                    "Transpose", [activation], [transposed], perm=[1, 0], name=f"{name}_transpose"
                )
            )
            activation = transposed
        if not bias_name:
            new_nodes.append(
                helper.make_node(
                    "MatMul", [activation, weight_name], [node.output[0]], name=f"{name}_matmul"
                )
            )
        else:
            if beta != 1.0:
                bias = numpy_helper.to_array(initializers[bias_name])
                bias_name = f"{name}_add_bias"
                model.graph.initializer.append(
                    numpy_helper.from_array(
                        np.ascontiguousarray(bias * np.asarray(beta, dtype=bias.dtype)), bias_name
                    )
                )
            product = f"{name}_matmul_output"
            new_nodes.append(
                helper.make_node(
                    "MatMul", [activation, weight_name], [product], name=f"{name}_matmul"
                )
            )
            new_nodes.append(
                helper.make_node("Add", [product, bias_name], [node.output[0]], name=f"{name}_add")
            )
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_unused_initializers(model)
    return rewritten


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used.update(output.name for output in model.graph.output)
    kept = [initializer for initializer in model.graph.initializer if initializer.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _build_fp16(model: onnx.ModelProto, out_path: Path, calibration: np.ndarray | None) -> None:
    # keep_io_types: callers keep feeding float32 images and reading float32 logits.
    converted: onnx.ModelProto = convert_float_to_float16(model, keep_io_types=True)
    write_onnx_atomically(converted, out_path)


def _build_int8_dynamic(
    model: onnx.ModelProto, out_path: Path, calibration: np.ndarray | None
) -> None:
    # Only MatMul/Gemm: dynamic INT8 convolutions (ConvInteger) run ~6x slower on CPU.
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        staged = Path(scratch) / out_path.name
        quantize_dynamic(
            model,
            staged,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=False,
            weight_type=QuantType.QInt8,
        )
        write_onnx_atomically(onnx.load(str(staged)), out_path)


def _build_int8_static(
    model: onnx.ModelProto, out_path: Path, calibration: np.ndarray | None
) -> None:
    if calibration is None or len(calibration) == 0:
        raise ConfigError("INT8_STATIC needs a non-empty calibration array")
    reader = ArrayCalibrationReader(_input_name(model), calibration)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        staged = Path(scratch) / out_path.name
        quantize_static(
            model,
            staged,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # Unsigned activations: with int8 ones ONNX Runtime's CPU provider leaves
            # the convolutions in FP32 between Q/DQ pairs (2.1x FP32's batch-1 time on
            # the demo CNN); uint8 ones fuse into QLinearConv (1.5x; QGemm either way).
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # Only the weight-bearing ops: quantising the norm and reshape glue adds
            # Q/DQ pairs (and bytes) and saves nothing.
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            # 7-bit weights: uint8 x int8 products can saturate the int16 accumulators
            # of AVX2 CPUs without VNNI (ONNX Runtime's quantisation guide); measured
            # here: the same accuracy as FP32 instead of 0.15 points below, no slower.
            reduce_range=True,
        )
        write_onnx_atomically(onnx.load(str(staged)), out_path)


def _import_matmul_nbits_quantizer() -> ModuleType:
    # The module calls logging.basicConfig(level=INFO) on import, which would give the
    # root logger a handler behind the application's back; undo that.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    module = importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return module


def _build_int4_weight_only(
    model: onnx.ModelProto, out_path: Path, calibration: np.ndarray | None
) -> None:
    rewritten = rewrite_gemm_as_matmul_add(model)
    logger.debug("rewrote %d Gemm nodes as MatMul + Add", rewritten)
    matmul_nbits_quantizer = _import_matmul_nbits_quantizer()
    quantizer = matmul_nbits_quantizer.MatMulNBitsQuantizer(
        model, bits=4, block_size=_INT4_BLOCK_SIZE, is_symmetric=True
    )
    quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    if not any(node.op_type == "MatMulNBits" for node in quantized.graph.node):
        raise ConfigError("INT4_WEIGHT_ONLY found no MatMul with constant weights to quantise")
    write_onnx_atomically(quantized, out_path)


_BUILDERS: dict[Precision, Callable[[onnx.ModelProto, Path, np.ndarray | None], None]] = {
    Precision.FP16: _build_fp16,
    Precision.INT8_DYNAMIC: _build_int8_dynamic,
    Precision.INT8_STATIC: _build_int8_static,
    Precision.INT4_WEIGHT_ONLY: _build_int4_weight_only,
}


def _quiet_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop the quantiser's root-logger advice to run ``quant_pre_process`` first.

    Measured here: pre-processing (symbolic shape inference and graph optimisation)
    changes neither the size, the accuracy nor the latency of the INT8 variants of
    fedge's models, so the advice is noise on every build.
    """
    return not record.getMessage().startswith("Please consider")


def build_variant(
    fp32_path: Path, variant: Precision, out_path: Path, *, calibration: np.ndarray | None = None
) -> Path:
    """Write the ``variant`` of the FP32 model at ``fp32_path`` to ``out_path``.

    Parameters
    ----------
    fp32_path
        A valid FP32 ONNX model with one float input.
    variant
        Which reduced-precision variant to build.
    out_path
        Where to write it (atomically); must differ from ``fp32_path``.
    calibration
        Representative inputs (e.g. float images in [0, 1] of shape (N, 1, 28, 28));
        required for ``INT8_STATIC``, ignored otherwise.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    ConfigError
        If ``variant`` is not a :class:`Precision`, the paths coincide, calibration is
        missing for ``INT8_STATIC``, or the model has nothing the variant can quantise.
    DataError
        If ``fp32_path`` is missing or not a valid ONNX model.
    """
    if not isinstance(variant, Precision):
        raise ConfigError(
            f"unknown variant {variant!r}; choose one of {[p.value for p in Precision]}"
        )
    if Path(out_path).resolve() == Path(fp32_path).resolve():
        raise ConfigError("out_path must differ from fp32_path")
    model = load_onnx(Path(fp32_path))
    # Dynamo exports name initializers in value_info, which breaks quantisation's
    # shape inference; stripping is a no-op on files export_onnx wrote.
    strip_initializer_value_info(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.addFilter(_quiet_preprocessing_advice)
    try:
        _BUILDERS[variant](model, out_path, calibration)
    finally:
        root.removeFilter(_quiet_preprocessing_advice)
    logger.info(
        "built %s variant at %s (%d bytes)", variant.value, out_path, out_path.stat().st_size
    )
    return out_path


def evaluate_onnx(
    path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
) -> tuple[float, np.ndarray]:
    """Run the model at ``path`` on the CPU provider; return top-1 accuracy and all logits.

    Raises
    ------
    ConfigError
        If ``images`` and ``labels`` differ in length, are empty, or ``batch_size`` < 1.
    DataError
        If ``path`` is missing or ONNX Runtime cannot load it.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if len(images) == 0 or len(images) != len(labels):
        raise ConfigError(
            f"need as many labels as images (> 0), got {len(images)} and {len(labels)}"
        )
    if not Path(path).is_file():
        raise DataError(f"ONNX model {str(path)!r} does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidProtobuf types
        raise DataError(f"ONNX Runtime cannot load {str(path)!r}: {error}") from error
    input_name = session.get_inputs()[0].name
    batches = []
    for start in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        (logits,) = session.run(None, {input_name: chunk})
        batches.append(np.asarray(logits, dtype=np.float32))
    all_logits = np.concatenate(batches)
    accuracy = float(np.mean(all_logits.argmax(axis=1) == np.asarray(labels)))
    return accuracy, all_logits


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Return the fraction of rows whose arg-max class is the same in both arrays.

    Raises
    ------
    ConfigError
        If the arrays are not 2-D, differ in shape, or are empty.
    """
    if logits_a.ndim != 2 or logits_a.shape != logits_b.shape or len(logits_a) == 0:
        raise ConfigError(
            "need two non-empty (N, C) arrays of one shape, "
            f"got {logits_a.shape} and {logits_b.shape}"
        )
    return float(np.mean(logits_a.argmax(axis=1) == logits_b.argmax(axis=1)))
