"""Central evaluation of a global model on the server's held-out examples."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord

from edge_runtime.models import ModelName, build_model, evaluate
from fl_server.federation import CentralEvaluator, Evaluation

__all__ = ["central_evaluator"]


def central_evaluator(
    model: ModelName, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.integer]
) -> CentralEvaluator:
    """Return an evaluator of ``model``'s weights on the examples (one model reused)."""
    network = build_model(model)

    def _evaluate(arrays: ArrayRecord) -> Evaluation:
        network.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        result = evaluate(network, images, labels)
        return Evaluation(loss=result.loss, accuracy=result.accuracy)

    return _evaluate
