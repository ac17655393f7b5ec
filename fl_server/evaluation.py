"""Central evaluation of a global model on the server's held-out examples."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord

from edge_runtime.model_spec import ModelSpec
from edge_runtime.models import ModelName, evaluate
from fl_server.federation import CentralEvaluator, Evaluation

__all__ = ["central_evaluator"]


def central_evaluator(
    model: ModelName | ModelSpec, images: npt.NDArray[Any], labels: npt.NDArray[np.integer]
) -> CentralEvaluator:
    """Return an evaluator of ``model``'s weights on the examples (one model reused)."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.of(model)
    network = spec.build()

    def _evaluate(arrays: ArrayRecord) -> Evaluation:
        network.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        result = evaluate(network, images, labels, encoding=spec.encoding)
        return Evaluation(loss=result.loss, accuracy=result.accuracy)

    return _evaluate
