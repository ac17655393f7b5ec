"""Build a serialised TensorRT engine from an ONNX file, when TensorRT is installed.

The ``tensorrt`` Python package exists only for NVIDIA GPUs (and needs the matching
``libnvinfer``), so it is an optional extra imported on demand: nothing in
fedge fails to import without it, :func:`tensorrt_available` answers without
raising, and :func:`build_engine` explains how to install it.

Notes
-----
ONNX Runtime's TensorRT execution provider (:mod:`edge_runtime.providers`) builds
engines itself and is the usual path; a stand-alone engine is for devices that run
TensorRT without ONNX Runtime. Engines are specific to the GPU model and the
TensorRT version that built them, so build on (a twin of) the target device.
The dynamic batch dimension gets one optimisation profile ``1 .. max_batch``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from edge_runtime.durable import write_atomically
from fedge.errors import ConfigError, DataError

__all__ = ["build_engine", "tensorrt_available"]

logger = logging.getLogger(__name__)

_MODULE = "tensorrt"
_INSTALL_HINT = (
    "TensorRT is not available: install the optional extra `pip install 'fedge[tensorrt]'` "
    "on a machine with an NVIDIA GPU and a matching driver"
)


def tensorrt_available() -> bool:
    """Return whether the ``tensorrt`` package can be imported; never raises."""
    try:
        if importlib.util.find_spec(_MODULE) is None:
            return False
        importlib.import_module(_MODULE)
    except Exception as error:  # a broken install raises OSError (no libnvinfer), ...
        logger.debug("tensorrt is present but cannot be imported: %s", error)
        return False
    return True


def _import_tensorrt() -> Any:
    if not tensorrt_available():
        raise ConfigError(_INSTALL_HINT)
    return importlib.import_module(_MODULE)


def _write_engine(payload: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, payload)


def _add_batch_profile(builder: Any, network: Any, config: Any, max_batch: int) -> None:
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(int(dim) for dim in tensor.shape)
        if any(dim < 0 for dim in shape[1:]):
            raise ConfigError(
                f"input {tensor.name!r} has dynamic dimensions other than the batch: {shape}"
            )
        if shape and shape[0] < 0:
            rest = shape[1:]
            optimum = max(1, max_batch // 2)
            profile.set_shape(tensor.name, (1, *rest), (optimum, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    fp16: bool = True,
    workspace_mb: int = 1024,
    max_batch: int = 32,
) -> Path:
    """Build a TensorRT engine for the ONNX model at ``onnx_path`` and write it atomically.

    Parameters
    ----------
    onnx_path
        The ONNX model (FP32; TensorRT chooses FP16 kernels itself when ``fp16``).
    engine_path
        Where the serialised engine goes; replaced atomically if it exists.
    fp16
        Allow FP16 kernels (when the GPU has fast FP16).
    workspace_mb
        The builder's scratch-memory limit in MiB.
    max_batch
        The largest batch the engine accepts on a dynamic batch dimension.

    Returns
    -------
    Path
        ``engine_path``.

    Raises
    ------
    ConfigError
        If TensorRT is not installed (the message says how to install it), an
        argument is out of range, the parser rejects the model, or the build fails.
    DataError
        If ``onnx_path`` does not exist.
    """
    if workspace_mb < 1:
        raise ConfigError(f"workspace_mb must be at least 1, got {workspace_mb}")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise DataError(f"ONNX model {str(onnx_path)!r} does not exist")
    trt = _import_tensorrt()

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # TensorRT 10 networks are always explicit-batch; the flag is 0 there.
    flags = (
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
        else 0
    )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {str(onnx_path)!r}: {errors or 'no detail'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16 and getattr(builder, "platform_has_fast_fp16", True):
        config.set_flag(trt.BuilderFlag.FP16)
    _add_batch_profile(builder, network, config, max_batch)

    serialised = builder.build_serialized_network(network, config)
    if serialised is None:
        raise ConfigError(f"TensorRT failed to build an engine for {str(onnx_path)!r}")
    payload = bytes(serialised)
    _write_engine(payload, engine_path)
    logger.info("built TensorRT engine %s (%d bytes, fp16=%s)", engine_path, len(payload), fp16)
    return engine_path
