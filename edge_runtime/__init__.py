"""What a device needs to serve a model: ONNX export, variants, providers, a verified cache.

Built so far: ONNX export with an output-parity check against torch
(:func:`export_onnx`) and the quantised variants (:func:`build_variant`: FP16,
INT8 static QDQ, INT8 dynamic, INT4 weight-only) with their evaluation
(:func:`evaluate_onnx`, :func:`top1_agreement`). Execution providers, the local
model cache, inference serving and drift detection come with the edge-runtime issue.
"""

from edge_runtime.export import Exporter, ExportResult, export_onnx
from edge_runtime.quantize import Precision, build_variant, evaluate_onnx, top1_agreement

__all__ = [
    "ExportResult",
    "Exporter",
    "Precision",
    "build_variant",
    "evaluate_onnx",
    "export_onnx",
    "top1_agreement",
]
