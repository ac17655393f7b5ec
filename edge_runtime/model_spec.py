"""A torch model named by a built-in name or by import path, and how its inputs are encoded.

A scenario (``[model]`` in a scenario file) brings its own architecture as
``"package.module:Factory"`` with keyword arguments; the built-in Fashion-MNIST
models are the same thing under a short name. Both sides of a federation build
the model from the same :class:`ModelSpec` (the server its initial weights and
central evaluation, every client its local copy), so the state-dict layouts agree.

The examples a data set yields are turned into tensors one way per
:class:`InputEncoding`: uint8 images become float images in [0, 1] with a
channel axis (the built-in models normalise them themselves); float features are
passed as float32 unchanged.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edge_runtime.models import InputEncoding, ModelName, build_model, to_tensor
from fedge.errors import ConfigError

__all__ = ["InputEncoding", "ModelKwarg", "ModelSpec", "to_tensor"]

ModelKwarg = bool | int | float | str | tuple[int, ...]
"""A value a scenario file may pass to a model's constructor."""

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}$")


def _resolve(import_path: str) -> Callable[..., Any]:
    module_name, _, attribute = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import the model's module {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"{module_name} has no callable {attribute!r} (model {import_path!r})")
    return factory  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A model architecture: a built-in name or an import path, its arguments, its inputs.

    Parameters
    ----------
    builtin
        A built-in architecture (its encoding is ``UINT8_IMAGES``); ``None`` with ``import_path``.
    import_path
        ``"package.module:Factory"``: a ``torch.nn.Module`` subclass or a function
        returning one, importable on the server and on every client.
    kwargs
        Keyword arguments of the factory, as sorted ``(name, value)`` pairs.
    encoding
        How the data set's examples become the model's input.

    Raises
    ------
    ConfigError
        If neither or both of ``builtin`` and ``import_path`` are given, the path is
        not ``module:attribute``, or a keyword is not an identifier.
    """

    builtin: ModelName | None = None
    import_path: str | None = None
    kwargs: tuple[tuple[str, ModelKwarg], ...] = ()
    encoding: InputEncoding = InputEncoding.UINT8_IMAGES

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.import_path is None):
            raise ConfigError("a model is either a built-in name or an import path, not both")
        if self.builtin is not None and not isinstance(self.builtin, ModelName):
            raise ConfigError(f"unknown built-in model {self.builtin!r}")
        if self.import_path is not None and not _IMPORT_PATH.match(self.import_path):
            raise ConfigError(
                f"a model's import path reads 'package.module:Factory', got {self.import_path!r}"
            )
        if not isinstance(self.encoding, InputEncoding):
            raise ConfigError(f"unknown input encoding {self.encoding!r}")
        for name, _value in self.kwargs:
            if not name.isidentifier():
                raise ConfigError(f"model argument names must be identifiers, got {name!r}")
        if self.builtin is not None and self.kwargs:
            raise ConfigError("built-in models take no arguments")

    @classmethod
    def of(cls, name: ModelName) -> ModelSpec:
        """Return the spec of a built-in architecture."""
        return cls(builtin=name)

    @property
    def label(self) -> str:
        """The built-in name, or the import path."""
        if self.builtin is not None:
            return self.builtin.value
        assert self.import_path is not None
        return self.import_path

    def build(self, *, seed: int | None = None) -> nn.Module:
        """Build a freshly initialised model; with ``seed``, its weights are a function of it.

        Raises
        ------
        ConfigError
            If the factory cannot be imported, rejects the arguments, or returns
            something that is not a ``torch.nn.Module``.
        """
        if self.builtin is not None:
            return build_model(self.builtin, seed=seed)
        assert self.import_path is not None
        factory = _resolve(self.import_path)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            try:
                model = factory(**dict(self.kwargs))
            except TypeError as exc:
                raise ConfigError(f"model {self.import_path}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model {self.import_path} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    def to_json(self) -> dict[str, Any]:
        """Return the spec as JSON-ready values."""
        return {
            "name": self.label,
            "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs},
            "encoding": self.encoding.value,
        }
