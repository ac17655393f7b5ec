"""Open an ONNX Runtime session on the best execution provider and say which one runs.

ONNX Runtime falls back to its CPU provider *silently* when the TensorRT or CUDA
libraries are missing or fail to load: the session is created, only slower. So
:func:`open_session` never trusts what it asked for; it reads
``session.get_providers()`` afterwards and reports the provider that really runs,
with the reason when it is not the first preference.

Notes
-----
The default preference is TensorRT > CUDA > CPU. The CPU provider is always
appended as the last resort (ONNX Runtime adds it anyway, for the nodes the other
providers do not take), so a device without a GPU still serves; callers that must
not run on the CPU pass ``require=``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import onnxruntime as ort

from fedge.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_PREFERENCE",
    "ExecutionProvider",
    "SessionInfo",
    "installed_providers",
    "open_session",
]

logger = logging.getLogger(__name__)

_ORT_LOG_ERRORS_ONLY = 3


class ExecutionProvider(Enum):
    """The ONNX Runtime execution providers fedge knows, by their ORT names."""

    TENSORRT = "TensorrtExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    CPU = "CPUExecutionProvider"


DEFAULT_PREFERENCE: tuple[ExecutionProvider, ...] = (
    ExecutionProvider.TENSORRT,
    ExecutionProvider.CUDA,
    ExecutionProvider.CPU,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """A session and the truth about where it runs.

    Attributes
    ----------
    session
        The ``onnxruntime.InferenceSession``.
    requested
        The preference the caller gave, best first.
    active
        The provider ONNX Runtime reports first for this session, i.e. the one that
        runs the graph (CPU may also run the nodes the active provider does not take).
    fallback_reason
        Why ``active`` is not ``requested[0]``; None when it is.
    """

    session: Any
    requested: tuple[ExecutionProvider, ...]
    active: ExecutionProvider
    fallback_reason: str | None

    def __post_init__(self) -> None:
        if not self.requested:
            raise ConfigError("requested must name at least one execution provider")
        if (self.fallback_reason is None) != (self.active is self.requested[0]):
            raise ConfigError(
                "fallback_reason must be given exactly when active is not the first preference"
            )


def installed_providers() -> list[ExecutionProvider]:
    """Return the known execution providers this onnxruntime build offers, best first.

    Returns
    -------
    list[ExecutionProvider]
        In the order of :data:`DEFAULT_PREFERENCE`; providers fedge does not know
        (e.g. ``AzureExecutionProvider``) are left out.
    """
    available = set(ort.get_available_providers())
    return [provider for provider in DEFAULT_PREFERENCE if provider.value in available]


def _check_preference(
    preference: Sequence[ExecutionProvider] | None,
) -> tuple[ExecutionProvider, ...]:
    if preference is None:
        return DEFAULT_PREFERENCE
    chosen = tuple(preference)
    if not chosen:
        raise ConfigError("preference must name at least one execution provider")
    unknown = [item for item in chosen if not isinstance(item, ExecutionProvider)]
    if unknown:
        raise ConfigError(
            f"preference holds {unknown!r}; use ExecutionProvider members "
            f"({[provider.name for provider in ExecutionProvider]})"
        )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"preference names a provider twice: {[p.name for p in chosen]}")
    return chosen


def _fallback_reason(
    requested: tuple[ExecutionProvider, ...],
    installed: list[ExecutionProvider],
    active: ExecutionProvider,
) -> str | None:
    if active is requested[0]:
        return None
    reasons = []
    for provider in requested:
        if provider is active:
            break
        if provider in installed:
            reasons.append(
                f"{provider.value} is installed but did not load (ONNX Runtime fell back; "
                "check the CUDA/cuDNN/TensorRT libraries and the device)"
            )
        else:
            reasons.append(f"{provider.value} is not installed in this onnxruntime build")
    if active not in requested:
        reasons.append(f"{active.value} is not in the preference but is what ONNX Runtime chose")
    return "; ".join(reasons) + f"; running on {active.value}"


def open_session(
    model_path: Path | str,
    *,
    preference: Sequence[ExecutionProvider] | None = None,
    require: ExecutionProvider | None = None,
    intra_op_threads: int | None = None,
) -> SessionInfo:
    """Create an inference session on the best installed provider and report the real one.

    Parameters
    ----------
    model_path
        An ONNX model file.
    preference
        Providers to try, best first (default TensorRT > CUDA > CPU). Those not
        installed are skipped; CPU is always tried last.
    require
        When given, the provider that must end up active.
    intra_op_threads
        Threads ONNX Runtime may use inside one operator (default: its own choice).

    Returns
    -------
    SessionInfo
        The session, the preference, the active provider and why it is not the first
        preference (also logged once as a warning).

    Raises
    ------
    ConfigError
        If ``preference``, ``require`` or ``intra_op_threads`` is invalid, or if
        ``require`` is not the provider that became active.
    DataError
        If ``model_path`` is missing or ONNX Runtime cannot load it.
    """
    requested = _check_preference(preference)
    if require is not None and not isinstance(require, ExecutionProvider):
        raise ConfigError(f"require must be an ExecutionProvider or None, got {require!r}")
    if intra_op_threads is not None and (
        isinstance(intra_op_threads, bool)
        or not isinstance(intra_op_threads, int)
        or intra_op_threads < 1
    ):
        raise ConfigError(
            f"intra_op_threads must be a positive int or None, got {intra_op_threads!r}"
        )
    path = Path(model_path)
    if not path.is_file():
        raise DataError(f"ONNX model {str(path)!r} does not exist")

    installed = installed_providers()
    to_try = [provider for provider in requested if provider in installed]
    if ExecutionProvider.CPU not in to_try:
        to_try.append(ExecutionProvider.CPU)
    options = ort.SessionOptions()
    # ORT's own log goes to stderr behind the application's back; the fallback it would
    # warn about is reported below, through logging, from what the session says.
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    try:
        session = ort.InferenceSession(
            str(path), options, providers=[provider.value for provider in to_try]
        )
    except Exception as error:  # ORT raises InvalidProtobuf, Fail, InvalidGraph, ...
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise DataError(f"ONNX Runtime cannot load {str(path)!r}: {first_line}") from error

    known = {provider.value: provider for provider in ExecutionProvider}
    active_names = [name for name in session.get_providers() if name in known]
    if not active_names:  # pragma: no cover - ORT always reports the CPU provider
        raise ConfigError(f"ONNX Runtime reports no known provider: {session.get_providers()}")
    active = known[active_names[0]]
    reason = _fallback_reason(requested, installed, active)
    if reason is not None:
        logger.warning("execution provider fallback for %s: %s", path.name, reason)
    if require is not None and active is not require:
        raise ConfigError(
            f"{require.value} is required but {active.value} is active"
            + (f" ({reason})" if reason else "")
        )
    logger.info("opened %s on %s", path.name, active.value)
    return SessionInfo(session=session, requested=requested, active=active, fallback_reason=reason)
