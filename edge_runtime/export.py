"""Export a torch model to ONNX and prove the file computes what the model computes.

The exported graph has one input ``images`` and one output ``logits``, both with a
dynamic batch dimension. The file is written atomically (temporary file, then
rename), so a reader never sees a half-written model, and it is only kept when an
ONNX Runtime CPU session reproduces the eager torch output within ``atol``.

Notes
-----
``torch.onnx.export(..., dynamo=True)`` is tried first; it needs ``onnxscript``.
When it fails the legacy TorchScript exporter is used. The dynamo exporter records
``value_info`` entries for initializers, which make ONNX Runtime's quantisation
tools fail shape inference (``ShapeInferenceError ... (512) vs (32)``); they carry
no information an initializer does not already hold, so they are removed here.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edge_runtime.durable import write_atomically
from fedge.errors import ConfigError, DataError, StorageError

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportResult",
    "Exporter",
    "export_onnx",
    "load_onnx",
    "strip_debug_metadata",
    "strip_initializer_value_info",
    "write_onnx_atomically",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
_PARITY_ATOL = 1e-4
_MIN_OPSET = 13


class Exporter(Enum):
    """Which torch exporter produced a file."""

    DYNAMO = "dynamo"
    LEGACY = "legacy"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how closely it matches torch."""

    path: Path
    exporter: Exporter
    max_abs_diff: float
    size_bytes: int


def strip_initializer_value_info(model: onnx.ModelProto) -> int:
    """Remove, in place, the ``graph.value_info`` entries that name initializers.

    Returns
    -------
    int
        How many entries were removed.
    """
    initializer_names = {initializer.name for initializer in model.graph.initializer}
    kept = [info for info in model.graph.value_info if info.name not in initializer_names]
    removed = len(model.graph.value_info) - len(kept)
    if removed:
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return removed


def strip_debug_metadata(model: onnx.ModelProto) -> int:
    """Remove, in place, every node's ``metadata_props`` and ``doc_string``.

    The dynamo exporter records a Python stack trace per node, with the absolute
    paths of the exporting machine's source files: ~25 kB of a 114k-parameter
    CNN, shipped to every device and leaking the build host's layout. Nothing at
    run time reads them.

    Returns
    -------
    int
        How many bytes of metadata were removed.
    """
    removed = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            removed += sum(len(p.key) + len(p.value) for p in node.metadata_props)
            removed += len(node.doc_string)
            del node.metadata_props[:]
            node.doc_string = ""
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    return removed


def write_onnx_atomically(model: onnx.ModelProto, path: Path) -> int:
    """Serialise ``model`` (weights inline) to ``path`` via a temporary file and a rename.

    Returns
    -------
    int
        The size of the written file in bytes.

    Raises
    ------
    StorageError
        If the file cannot be written.
    """
    payload = model.SerializeToString()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, payload)
    except OSError as error:
        raise StorageError(f"cannot write {str(path)!r}: {error}") from error
    return len(payload)


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file.

    Raises
    ------
    DataError
        If the file is missing, is not an ONNX model, or fails the ONNX checker.
    """
    if not path.is_file():
        raise DataError(f"ONNX model {str(path)!r} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # onnx raises DecodeError, ValidationError, ...
        raise DataError(f"{str(path)!r} is not a valid ONNX model: {error}") from error
    if not model.graph.node:
        raise DataError(f"{str(path)!r} is not a valid ONNX model: the graph has no nodes")
    return model


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1)
    # The exporter warns about torchvision ops it cannot register (torchvision is not
    # a dependency) and about a deprecated pytree API it uses itself: noise here.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("the dynamo exporter returned no program")
    return program.model_proto


def _export_legacy(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "legacy.onnx"
        torch.onnx.export(
            model,
            (example,),
            staged,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
        return onnx.load(str(staged))


def _run_cpu(serialised: bytes, example: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(serialised, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    (logits,) = session.run(None, {input_name: example})
    return np.asarray(logits)


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    *,
    example: torch.Tensor,
    opset: int = 18,
    atol: float = _PARITY_ATOL,
) -> ExportResult:
    """Export ``model`` to ``path`` and check ONNX Runtime reproduces it on ``example``.

    Parameters
    ----------
    model
        The model; it is put in eval mode (and left there).
    path
        Where the ``.onnx`` file goes; replaced atomically if it exists.
    example
        A float32 batch the model accepts; its first dimension is exported as dynamic.
        Use a batch of at least two so the exporter does not specialise on 1.
    opset
        The ONNX opset, at least 13.
    atol
        The largest absolute logit difference allowed between torch and ONNX Runtime.

    Returns
    -------
    ExportResult
        The path, the exporter that worked, the measured difference and the file size.

    Raises
    ------
    ConfigError
        If ``opset``, ``atol`` or ``example`` is invalid, if both exporters fail, or if
        the exported graph's output differs from torch by more than ``atol`` (nothing
        is written then).
    """
    if opset < _MIN_OPSET:
        raise ConfigError(f"opset must be at least {_MIN_OPSET}, got {opset}")
    if not atol > 0:
        raise ConfigError(f"atol must be positive, got {atol}")
    if example.dtype != torch.float32:
        raise ConfigError(f"example must be float32, got {example.dtype}")
    if example.ndim < 1 or example.shape[0] < 1:
        raise ConfigError(
            f"example must have a non-empty batch dimension, got {tuple(example.shape)}"
        )

    model.eval()
    example = example.detach().cpu()
    with torch.no_grad():
        expected = model(example).detach().cpu().numpy()

    try:
        proto = _export_dynamo(model, example, opset)
        exporter = Exporter.DYNAMO
    except Exception as dynamo_error:  # the dynamo exporter raises many types
        logger.warning(
            "dynamo export failed (%s); falling back to the legacy exporter", dynamo_error
        )
        try:
            proto = _export_legacy(model, example, opset)
        except Exception as legacy_error:
            raise ConfigError(
                f"both ONNX exporters failed: dynamo: {dynamo_error}; legacy: {legacy_error}"
            ) from legacy_error
        exporter = Exporter.LEGACY

    removed = strip_initializer_value_info(proto)
    logger.debug("removed %d initializer value_info entries", removed)
    logger.debug("removed %d bytes of per-node debug metadata", strip_debug_metadata(proto))
    onnx.checker.check_model(proto)

    actual = _run_cpu(proto.SerializeToString(), example.numpy())
    if actual.shape != expected.shape:
        raise ConfigError(
            f"exported model output shape {actual.shape} differs from torch's {expected.shape}"
        )
    max_abs_diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if not max_abs_diff <= atol:
        raise ConfigError(
            f"exported model differs from torch by {max_abs_diff:.3g} (> atol {atol:.3g}); "
            f"not writing {str(path)!r}"
        )

    size_bytes = write_onnx_atomically(proto, path)
    logger.info(
        "exported %s with the %s exporter: %d bytes, max |diff| %.3g",
        path,
        exporter.value,
        size_bytes,
        max_abs_diff,
    )
    return ExportResult(
        path=path, exporter=exporter, max_abs_diff=max_abs_diff, size_bytes=size_bytes
    )
