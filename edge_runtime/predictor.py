"""Serve one ONNX model in process: checked inputs, atomic swap, latency, micro-batching.

:class:`Predictor` runs a session from :func:`edge_runtime.providers.open_session`;
:class:`~edge_runtime.batching.MicroBatcher` gathers single requests from many
threads into one batched call; :class:`~edge_runtime.latency.LatencyHistogram`
keeps the per-call latencies.

Notes
-----
A swap loads and checks the new model *before* it takes the lock, so serving never
stops for a load and a file that fails to load leaves the old model serving. Calls
already running finish on the session they started with.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.latency import LatencyHistogram
from edge_runtime.providers import ExecutionProvider, SessionInfo, open_session
from fedge.errors import ConfigError, FedgeError

__all__ = ["Predictor"]

logger = logging.getLogger(__name__)

_MODEL_ID = re.compile(r"[A-Za-z0-9_.:@+/\-]{1,128}")
_FLOAT_INPUT = "tensor(float)"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Loaded:
    info: SessionInfo
    input_name: str
    sample_shape: tuple[int | None, ...]
    model_id: str


def _check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or _MODEL_ID.fullmatch(model_id) is None:
        raise ConfigError(
            f"model_id must be 1-128 characters of letters, digits and _.:@+/-, got {model_id!r}"
        )
    return model_id


def _shape_text(sample_shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join(["N", *("?" if dim is None else str(dim) for dim in sample_shape)]) + ")"


def _check_inputs(batch: object, sample_shape: tuple[int | None, ...]) -> np.ndarray:
    try:
        array = np.asarray(batch)
    except (ValueError, TypeError, OverflowError) as error:
        raise ConfigError(f"inputs are not a rectangular numeric array: {error}") from error
    if array.dtype.kind not in "fiu":
        raise ConfigError(f"inputs must be numbers convertible to float32, got dtype {array.dtype}")
    if (
        array.ndim != len(sample_shape) + 1
        or array.shape[0] < 1
        or any(
            want is not None and got != want
            for got, want in zip(array.shape[1:], sample_shape, strict=True)
        )
    ):
        raise ConfigError(
            f"inputs must have shape {_shape_text(sample_shape)} with N >= 1, "
            f"got {tuple(array.shape)}"
        )
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: caught below
        converted = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(converted).all():
        raise ConfigError("inputs must be finite: found NaN or infinity (after float32 conversion)")
    return converted


class Predictor:
    """Run one ONNX classifier on the best execution provider; swap it atomically.

    Parameters
    ----------
    model_path
        An ONNX model with one float32 input whose first dimension (the batch) is
        dynamic, e.g. a file written by :func:`edge_runtime.export.export_onnx`.
    model_id
        The label reported for health and metrics (default: the file name).
    preference, require, intra_op_threads
        Passed to :func:`~edge_runtime.providers.open_session`, also on every swap.
    clock
        A monotonic clock in seconds, for the latency histogram.

    Raises
    ------
    ConfigError
        If the model does not have one float32 input with a dynamic batch
        dimension, or an argument is invalid.
    DataError
        If the file is missing or ONNX Runtime cannot load it.
    """

    def __init__(
        self,
        model_path: Path | str,
        *,
        model_id: str | None = None,
        preference: Sequence[ExecutionProvider] | None = None,
        require: ExecutionProvider | None = None,
        intra_op_threads: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._preference = preference
        self._require = require
        self._intra_op_threads = intra_op_threads
        self._clock = clock
        self._latency = LatencyHistogram()
        self._lock = threading.Lock()
        self._loaded = self._load(Path(model_path), model_id)

    def _load(self, path: Path, model_id: str | None) -> _Loaded:
        label = _check_model_id(path.name if model_id is None else model_id)
        info = open_session(
            path,
            preference=self._preference,
            require=self._require,
            intra_op_threads=self._intra_op_threads,
        )
        inputs = info.session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"{path.name}: expected one model input, found {len(inputs)}")
        (spec,) = inputs
        if spec.type != _FLOAT_INPUT:
            raise ConfigError(f"{path.name}: the input must be float32, got {spec.type}")
        shape = list(spec.shape)
        if not shape or isinstance(shape[0], int):
            raise ConfigError(
                f"{path.name}: the input's first (batch) dimension must be dynamic, got {shape}; "
                "export with a dynamic batch (export_onnx does)"
            )
        sample_shape = tuple(dim if isinstance(dim, int) else None for dim in shape[1:])
        return _Loaded(
            info=info, input_name=str(spec.name), sample_shape=sample_shape, model_id=label
        )

    def _current(self) -> _Loaded:
        with self._lock:
            return self._loaded

    @property
    def provider(self) -> ExecutionProvider:
        """The execution provider that really runs the current model."""
        return self._current().info.active

    @property
    def fallback_reason(self) -> str | None:
        """Why the current model does not run on the first preference, if it does not."""
        return self._current().info.fallback_reason

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        """The shape of one input without the batch dimension (None: any size)."""
        return self._current().sample_shape

    @property
    def model_id(self) -> str:
        """The label of the model now serving."""
        return self._current().model_id

    @model_id.setter
    def model_id(self, value: str) -> None:
        label = _check_model_id(value)
        with self._lock:
            self._loaded = dataclasses.replace(self._loaded, model_id=label)

    @property
    def latency(self) -> LatencyHistogram:
        """The latency of every successful :meth:`predict` call."""
        return self._latency

    def check_inputs(self, batch: object) -> np.ndarray:
        """Return ``batch`` as a contiguous float32 array after checking it fits the model.

        Raises
        ------
        ConfigError
            If it is not numeric, has the wrong shape or holds NaN or infinity.
        """
        return _check_inputs(batch, self._current().sample_shape)

    def predict(self, batch: object) -> np.ndarray:
        """Return the model's first output (the logits) for a batch of inputs.

        Raises
        ------
        ConfigError
            If the inputs do not fit the model (see :meth:`check_inputs`).
        FedgeError
            If ONNX Runtime fails while running the model.
        """
        start = self._clock()
        loaded = self._current()
        inputs = _check_inputs(batch, loaded.sample_shape)
        try:
            outputs = loaded.info.session.run(None, {loaded.input_name: inputs})
        except Exception as error:  # ORT raises its own Fail/RuntimeException types
            raise FedgeError(f"inference failed on model {loaded.model_id}: {error}") from error
        logits = np.asarray(outputs[0])
        self._latency.record(max(0.0, self._clock() - start))
        return logits

    def swap(
        self,
        model_path: Path | str,
        *,
        model_id: str | None = None,
        allow_shape_change: bool = False,
    ) -> None:
        """Load ``model_path`` and make it the model that serves, atomically.

        Parameters
        ----------
        model_path
            The new model file.
        model_id
            Its label (default: the file name).
        allow_shape_change
            Accept a model whose input shape differs from the current one (requests
            shaped for the old model then fail validation).

        Raises
        ------
        ConfigError, DataError
            As for the constructor, or if the input shape changes and
            ``allow_shape_change`` is False; the old model keeps serving.
        """
        new = self._load(Path(model_path), model_id)  # outside the lock: serving goes on
        with self._lock:
            old = self._loaded
            if not allow_shape_change and new.sample_shape != old.sample_shape:
                raise ConfigError(
                    f"the new model takes {_shape_text(new.sample_shape)}, the current one "
                    f"{_shape_text(old.sample_shape)}; pass allow_shape_change=True to swap anyway"
                )
            self._loaded = new
        logger.info(
            "swapped model %s for %s on %s", old.model_id, new.model_id, new.info.active.value
        )
