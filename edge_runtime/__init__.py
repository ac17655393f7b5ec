"""What a device needs to serve a model: ONNX export, variants, providers, a verified cache.

Built by the edge-runtime issue; empty until then.
"""

__all__: list[str] = []
