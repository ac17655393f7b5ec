"""A device's part of a shared-noise DP-SGD step: its clipped per-example gradient sum.

The device Poisson-samples its examples (rate q, from its CSPRNG: the sample
is never revealed and amplifies privacy only because it is secret), clips each
example's gradient to C with fedge's book-keeping engine
(:mod:`fl_client.per_example`) and returns the sum in the order of the model's
``state_dict`` as float64, so nothing data-dependent passes through float32
weights on its way to :func:`strategies.sample_ddp.sddp_encode`. The sum never
leaves the device in clear: the secure-aggregation mod encodes and masks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn

from edge_runtime.models import InputEncoding, to_tensor
from fedge.errors import ConfigError

if TYPE_CHECKING:
    from fl_client.per_example import Randomness

__all__ = ["GRADIENT_SUM_KEY", "clipped_gradient_sum", "gradient_sum_of", "gradient_sum_record"]

GRADIENT_SUM_KEY: Final = "fedge.gradient-sum"
_VECTOR: Final = "sum"
_CHUNK: Final = 512


def clipped_gradient_sum(
    model: nn.Module,
    inputs: npt.NDArray[Any],
    labels: npt.NDArray[np.integer],
    *,
    example_clip: float,
    sample_rate: float,
    randomness: Randomness,
    encoding: InputEncoding = InputEncoding.UINT8_IMAGES,
) -> tuple[npt.NDArray[np.float64], int]:
    """Return the sum of the clipped gradients of a Poisson sample, and the sample's size.

    The size stays on the device (it is data, not covered by the noise).

    Raises
    ------
    ConfigError
        If the model cannot give per-example gradients or the data is empty.
    """
    # Imported here: Opacus (behind the per-example engines) only on devices that need it.
    from fl_client.per_example import GradSampleMode, make_engine

    if len(inputs) == 0 or len(inputs) != len(labels):
        raise ConfigError("a shared-noise DP-SGD step needs examples with one label each")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or {p.dtype for p in params} != {torch.float32}:
        raise ConfigError("shared-noise DP-SGD needs float32 trainable parameters")
    chosen = torch.nonzero(randomness.uniform(len(inputs)) < sample_rate).reshape(-1).numpy()
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    if chosen.shape[0]:
        model.train()
        engine = make_engine(GradSampleMode.BOOK_KEEPING, model, params, example_clip)
        try:
            for start in range(0, chosen.shape[0], _CHUNK):
                rows = chosen[start : start + _CHUNK]
                batch = to_tensor(inputs[rows], encoding)
                targets = torch.from_numpy(np.asarray(labels[rows], dtype=np.int64))
                parts, _ = engine.clipped_sum(batch, targets)
                for index, piece in enumerate(parts):
                    sums[index].add_(piece.detach().to(torch.float64))
        finally:
            engine.close()
    by_param = {id(p): s for p, s in zip(params, sums, strict=True)}
    named = dict(model.named_parameters())
    vectors = []
    for key, value in model.state_dict().items():
        param = named.get(key)
        part: torch.Tensor | None = None if param is None else by_param.get(id(param))
        vectors.append(np.zeros(value.numel()) if part is None else part.reshape(-1).numpy())
    return np.concatenate(vectors), int(chosen.shape[0])


def gradient_sum_record(vector: npt.NDArray[np.float64]) -> ArrayRecord:
    """Return the record the train handler hands the secure-aggregation mod."""
    return ArrayRecord({_VECTOR: Array(np.ascontiguousarray(vector, dtype=np.float64))})


def gradient_sum_of(content: RecordDict, dimension: int) -> npt.NDArray[np.float64]:
    """Return the gradient sum a train reply carries.

    Raises
    ------
    ConfigError
        If the reply has no gradient sum of ``dimension`` float64 values.
    """
    record = content.array_records.get(GRADIENT_SUM_KEY)
    if record is None or list(record.keys()) != [_VECTOR]:
        raise ConfigError("the train reply carries no clipped gradient sum")
    array = record[_VECTOR]
    if np.dtype(array.dtype) != np.float64 or tuple(array.shape) != (dimension,):
        raise ConfigError(f"the gradient sum must be {dimension} float64 values")
    return np.asarray(array.numpy(), dtype=np.float64)
