"""What a device needs to serve a model: export, variants, providers, a verified cache, drift.

- :mod:`edge_runtime.export`, :mod:`edge_runtime.quantize`: ONNX export with a
  parity check, and the FP16 / INT8 static / INT8 dynamic / INT4 variants;
- :mod:`edge_runtime.providers` (TensorRT > CUDA > CPU, the provider really in use),
  :mod:`edge_runtime.tensorrt_engine` (optional);
- :mod:`edge_runtime.manifest`, :mod:`edge_runtime.cache`, :mod:`edge_runtime.fetch`:
  signed manifests, the local model cache (verified atomic swap, rollback) and the
  HTTPS client that fills it from the model store;
- :mod:`edge_runtime.predictor`, :mod:`edge_runtime.batching`, :mod:`edge_runtime.server`:
  in-process inference, micro-batching, a local HTTP(S) server;
- :mod:`edge_runtime.drift`, :mod:`edge_runtime.edge_filter`, :mod:`edge_runtime.telemetry`:
  input drift, what is worth sending upstream, the offline buffer.

Names are imported lazily (PEP 562): a device that only serves ONNX models never
imports torch, which only the exporter needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real types for mypy; at run time __getattr__ imports on first use
    from edge_runtime.batching import MicroBatcher
    from edge_runtime.cache import InstalledModel, ModelCache, ModelCorrupt, ModelRejected
    from edge_runtime.drift import DriftConfig, DriftDetector
    from edge_runtime.drift_reference import ReferenceStats
    from edge_runtime.edge_filter import EdgeFilter, EdgeFilterConfig
    from edge_runtime.export import Exporter, ExportResult, export_onnx
    from edge_runtime.fetch import StoreClient
    from edge_runtime.latency import LatencyHistogram
    from edge_runtime.predictor import Predictor
    from edge_runtime.providers import (
        DEFAULT_PREFERENCE,
        ExecutionProvider,
        SessionInfo,
        installed_providers,
        open_session,
    )
    from edge_runtime.quantize import Precision, build_variant, evaluate_onnx, top1_agreement
    from edge_runtime.server import InferenceServer
    from edge_runtime.telemetry import TelemetryBuffer, TelemetryOffline

__all__ = [
    "DEFAULT_PREFERENCE",
    "DriftConfig",
    "DriftDetector",
    "EdgeFilter",
    "EdgeFilterConfig",
    "ExecutionProvider",
    "ExportResult",
    "Exporter",
    "InferenceServer",
    "InstalledModel",
    "LatencyHistogram",
    "MicroBatcher",
    "ModelCache",
    "ModelCorrupt",
    "ModelRejected",
    "Precision",
    "Predictor",
    "ReferenceStats",
    "SessionInfo",
    "StoreClient",
    "TelemetryBuffer",
    "TelemetryOffline",
    "build_variant",
    "evaluate_onnx",
    "export_onnx",
    "installed_providers",
    "open_session",
    "top1_agreement",
]

_HOMES = {
    "DEFAULT_PREFERENCE": "providers",
    "DriftConfig": "drift",
    "DriftDetector": "drift",
    "EdgeFilter": "edge_filter",
    "EdgeFilterConfig": "edge_filter",
    "ExecutionProvider": "providers",
    "ExportResult": "export",
    "Exporter": "export",
    "InferenceServer": "server",
    "InstalledModel": "cache",
    "LatencyHistogram": "latency",
    "MicroBatcher": "batching",
    "ModelCache": "cache",
    "ModelCorrupt": "cache",
    "ModelRejected": "cache",
    "Precision": "quantize",
    "Predictor": "predictor",
    "ReferenceStats": "drift_reference",
    "SessionInfo": "providers",
    "StoreClient": "fetch",
    "TelemetryBuffer": "telemetry",
    "TelemetryOffline": "telemetry",
    "build_variant": "quantize",
    "evaluate_onnx": "quantize",
    "export_onnx": "export",
    "installed_providers": "providers",
    "open_session": "providers",
    "top1_agreement": "quantize",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge_runtime.{home}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
