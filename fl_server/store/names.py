"""The names a model may have in the store (a signed manifest allows exactly these)."""

from __future__ import annotations

import re

from fedge.errors import ConfigError

__all__ = ["MODEL_NAME_PATTERN", "check_model_name"]

MODEL_NAME_PATTERN = "[A-Za-z0-9_.-]{1,64}"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def check_model_name(name: str, *, what: str = "model name") -> str:
    """Return ``name`` if the store can publish under it.

    The same rule as a manifest's model name (``edge_runtime.manifest``), checked
    when a run is configured rather than when its first version is published.

    Raises
    ------
    ConfigError
        If ``name`` does not match ``[A-Za-z0-9_.-]{1,64}`` or is ``.`` or ``..``.
    """
    if _MODEL_NAME.fullmatch(name) is None or name in {".", ".."}:
        raise ConfigError(
            f"{what} must match {MODEL_NAME_PATTERN} and not be '.' or '..', got {name!r:.80}"
        )
    return name
