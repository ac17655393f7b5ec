"""What a device measures about itself, so the cloud can pick a model variant per device class.

A device reports a :class:`DeviceProfile` in a ``device_profile`` event
(:mod:`edge_runtime.device_events`): the ONNX Runtime providers that really load,
its memory, the x86 features that decide how fast INT8 runs, and the batch-1 p50 of
each offered variant measured on the device itself (:func:`measure_profile`, the
``fedge edge bench`` measurement, shortened). The cloud groups devices by
:attr:`DeviceProfile.device_class` and picks, per class, the fastest variant within
the accuracy floor (:mod:`fl_server.rollout.variants`).

Notes
-----
One variant for every device is wrong: INT8 static runs about 1.4x *slower* than FP32
at batch 1 for the demo CNN on AVX2 CPUs without VNNI, and faster where VNNI (or a
GPU) serves it. Hence the class key: the best provider that loads, else the CPU's
INT8 instruction level.

The cloud receives profiles from devices, so :meth:`DeviceProfile.from_json` is
strict: exact keys, a format tag, known providers and features in canonical order,
finite non-negative numbers, at most :data:`MAX_ARTEFACTS` names. The class is never
sent: the cloud recomputes it from the fields, so a device cannot claim a class its
own report contradicts. The largest valid profile is well under the 15 KiB an event
body may hold.
"""

from __future__ import annotations

import logging
import math
import os
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fedge.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from edge_runtime.providers import ExecutionProvider

__all__ = [
    "CPU_FEATURES",
    "MAX_ARTEFACTS",
    "PROFILE_FORMAT",
    "PROVIDERS",
    "DeviceProfile",
    "measure_profile",
    "read_cpu_features",
    "total_memory_mb",
]

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "fedge/device-profile/v1"
MAX_ARTEFACTS = 32
# ONNX Runtime's names, best first (the order of edge_runtime.providers.DEFAULT_PREFERENCE;
# spelled out here so the cloud can parse a profile without importing onnxruntime).
PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
_GPU_CLASSES = (("TensorrtExecutionProvider", "tensorrt"), ("CUDAExecutionProvider", "cuda"))
# The x86 flags (as /proc/cpuinfo spells them) that set how fast ONNX Runtime's INT8
# kernels run: VNNI (AVX-512 or AVX) does a u8*s8 dot product in one instruction; without
# it INT8 needs three, and on a small CNN the quantise/dequantise around them loses.
CPU_FEATURES: tuple[str, ...] = ("amx_int8", "avx2", "avx512_vnni", "avx512f", "avx_vnni")
_VNNI = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_KEYS = frozenset({"format", "providers", "memory_mb", "cpu_features", "latency_ms"})
_MAX_MEMORY_MB = 2**31 - 1  # 2 PiB: fits a signed 32-bit column
_MIN_RUNS, _MAX_RUNS = 10, 10_000
_WARMUP_RUNS = 5
_BLOCK_RUNS = 10
_INPUT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ConfigError(f"{what} must match [A-Za-z0-9_.-]{{1,64}}, got {name!r:.70}")
    return name


def _check_string_tuple(what: str, value: object, known: tuple[str, ...]) -> tuple[str, ...]:
    """Check a tuple of known names, unique and in the order of ``known``."""
    if not isinstance(value, tuple) or len(value) > len(known):
        raise ConfigError(f"{what} must be a tuple of at most {len(known)} names")
    for item in value:
        if not isinstance(item, str) or item not in known:
            raise ConfigError(f"{what}: unknown name {item!r:.60}; known: {list(known)}")
    ordered = tuple(name for name in known if name in value)
    if value != ordered:
        raise ConfigError(
            f"{what} must be unique and in the order {list(known)}, got {list(value)}"
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """What one device measured about itself (see the module notes for the wire form).

    Parameters
    ----------
    providers
        The ONNX Runtime providers that really load on the device, best first
        (names from :data:`PROVIDERS`); at least one.
    memory_mb
        Total RAM in MiB; 0 when the device cannot tell.
    cpu_features
        The flags of :data:`CPU_FEATURES` the CPU has, in that (sorted) order; empty on
        non-x86 devices.
    latency_ms
        Artefact name -> batch-1 p50 in ms on this device; 1 to :data:`MAX_ARTEFACTS`
        entries, finite and non-negative.

    Raises
    ------
    ConfigError
        If a field is malformed (the message names it).
    """

    providers: tuple[str, ...]
    memory_mb: int
    cpu_features: tuple[str, ...]
    latency_ms: Mapping[str, float] = field(hash=False)

    def __post_init__(self) -> None:
        _check_string_tuple("providers", self.providers, PROVIDERS)
        if not self.providers:
            raise ConfigError("providers must name at least one execution provider")
        memory = self.memory_mb
        if isinstance(memory, bool) or not isinstance(memory, int):
            raise ConfigError(f"memory_mb must be an int, got {memory!r:.40}")
        if not 0 <= memory <= _MAX_MEMORY_MB:
            raise ConfigError(f"memory_mb must be in [0, {_MAX_MEMORY_MB}], got {memory}")
        _check_string_tuple("cpu_features", self.cpu_features, CPU_FEATURES)
        latency = self.latency_ms
        if not isinstance(latency, Mapping) or not 1 <= len(latency) <= MAX_ARTEFACTS:
            raise ConfigError(
                f"latency_ms must map 1 to {MAX_ARTEFACTS} artefact names to milliseconds"
            )
        checked: dict[str, float] = {}
        for name, value in latency.items():
            _check_name("latency_ms: an artefact name", name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(
                    f"latency_ms[{name!r}] must be a finite number >= 0, got {value!r:.40}"
                )
            checked[name] = float(value)
        object.__setattr__(self, "latency_ms", MappingProxyType(checked))

    @property
    def device_class(self) -> str:
        """Return the class key: the best GPU provider that loads, else the CPU's INT8 level.

        ``tensorrt``, ``cuda``; on the CPU ``cpu-vnni`` (AVX-512 VNNI, AVX-VNNI or AMX:
        INT8 dot products in one instruction), ``cpu-avx512``, ``cpu-avx2``, else ``cpu``
        (non-x86, or an older x86).
        """
        for provider, name in _GPU_CLASSES:
            if provider in self.providers:
                return name
        features = set(self.cpu_features)
        if features & _VNNI:
            return "cpu-vnni"
        if "avx512f" in features:
            return "cpu-avx512"
        if "avx2" in features:
            return "cpu-avx2"
        return "cpu"

    def to_json(self) -> dict[str, Any]:
        """Return the profile as the JSON body of a ``device_profile`` event."""
        return {
            "format": PROFILE_FORMAT,
            "providers": list(self.providers),
            "memory_mb": self.memory_mb,
            "cpu_features": list(self.cpu_features),
            "latency_ms": dict(self.latency_ms),
        }

    @classmethod
    def from_json(cls, raw: object) -> DeviceProfile:
        """Parse and validate a profile a device sent.

        Raises
        ------
        ConfigError
            If a key is missing or unknown, the format is not :data:`PROFILE_FORMAT`,
            or any field is malformed.
        """
        if not isinstance(raw, Mapping) or set(raw) != _KEYS:
            got = sorted(map(str, raw))[:8] if isinstance(raw, Mapping) else type(raw).__name__
            raise ConfigError(
                f"a device profile must have exactly the keys {sorted(_KEYS)}, got {got}"
            )
        if raw["format"] != PROFILE_FORMAT:
            raise ConfigError(
                f"device profile format must be {PROFILE_FORMAT!r}, got {raw['format']!r:.60}"
            )
        for key in ("providers", "cpu_features"):
            if not isinstance(raw[key], list):
                raise ConfigError(f"{key} must be a JSON array, got {type(raw[key]).__name__}")
        if not isinstance(raw["latency_ms"], Mapping):
            raise ConfigError(
                f"latency_ms must be a JSON object, got {type(raw['latency_ms']).__name__}"
            )
        return cls(
            providers=tuple(raw["providers"]),
            memory_mb=raw["memory_mb"],
            cpu_features=tuple(raw["cpu_features"]),
            latency_ms=raw["latency_ms"],
        )


def _read_proc(name: str) -> str | None:
    """Return the text of ``/proc/<name>``, or None where there is no such file."""
    try:
        return (Path("/proc") / name).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_cpu_features() -> tuple[str, ...]:
    """Return the :data:`CPU_FEATURES` this CPU has, from the first ``flags`` line of /proc/cpuinfo.

    Empty where there is no /proc/cpuinfo or no ``flags`` line (ARM reports
    ``Features``, with names of its own).
    """
    text = _read_proc("cpuinfo")
    if text is None:
        return ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return tuple(name for name in CPU_FEATURES if name in present)
    return ()


def total_memory_mb() -> int:
    """Return the total RAM in MiB (os.sysconf, else /proc/meminfo), or 0 when unknown."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        pages = page_size = -1
    if pages > 0 and page_size > 0:
        return min(pages * page_size // 2**20, _MAX_MEMORY_MB)
    text = _read_proc("meminfo") or ""
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB\s*$", text, flags=re.MULTILINE)
    return min(int(match.group(1)) // 1024, _MAX_MEMORY_MB) if match else 0


def _one_input(session: Any, path: Path) -> np.ndarray:
    import numpy as np

    spec = session.get_inputs()[0]
    shape = spec.shape[1:]
    if not all(isinstance(dim, int) for dim in shape):
        raise ConfigError(f"{path}: the input's non-batch dims must be fixed, got {shape}")
    dtype = _INPUT_DTYPES.get(spec.type)
    if dtype is None:
        raise ConfigError(f"{path}: input type {spec.type} is not float or float16")
    generator = np.random.default_rng(0)  # benchmark inputs, not secrets
    return generator.random((1, *shape), dtype=np.float32).astype(dtype)


def _loaded_providers(
    probe: Path, provider: str | None, intra_op_threads: int | None
) -> tuple[list[ExecutionProvider], Any]:
    """Return the providers that really load on ``probe`` (best first) and a session on the first.

    ONNX Runtime falls back to the CPU silently; a provider counts only if a session on
    it really has it active. With ``provider``, only it and those after it are tried,
    and it must load.
    """
    from edge_runtime.providers import ExecutionProvider, installed_providers, open_session

    candidates = [ExecutionProvider(name) for name in PROVIDERS]
    if provider is not None:
        if provider not in PROVIDERS:
            raise ConfigError(
                f"provider must be one of {list(PROVIDERS)} or None, got {provider!r:.60}"
            )
        candidates = candidates[PROVIDERS.index(provider) :]
    installed = installed_providers()
    candidates = [candidate for candidate in candidates if candidate in installed]
    if provider is not None and (not candidates or candidates[0].value != provider):
        raise ConfigError(f"{provider} is not installed in this onnxruntime build")
    loaded: list[ExecutionProvider] = []
    first_session: Any = None
    for candidate in candidates:
        info = open_session(probe, preference=(candidate,), intra_op_threads=intra_op_threads)
        if info.active is candidate:
            if not loaded:
                first_session = info.session
            loaded.append(candidate)
    if not loaded:  # pragma: no cover - the CPU provider always loads
        raise ConfigError("no execution provider loads on this device")
    if provider is not None and loaded[0].value != provider:
        raise ConfigError(f"{provider} is installed but does not load on this device")
    return loaded, first_session


def measure_profile(
    models: Mapping[str, Path],
    *,
    runs: int = 50,
    provider: str | None = None,
    intra_op_threads: int | None = None,
) -> DeviceProfile:
    """Measure this device: the providers that load, memory, CPU features, each model's p50.

    Each model is timed at batch 1 on random inputs of its input shape, on the best
    provider that really loads (or ``provider``), after a few untimed warm-up runs.
    The models are timed in interleaved blocks of ten runs, so a clock or thermal
    change during the measurement weighs on every model alike rather than on the one
    measured last.

    Parameters
    ----------
    models
        Artefact name -> ONNX file; 1 to :data:`MAX_ARTEFACTS` entries.
    runs
        Timed batch-1 runs per model (10 to 10,000).
    provider
        An ONNX Runtime provider name from :data:`PROVIDERS` to serve and measure on;
        the profile then reports only it and the providers after it, since a device
        that serves on the CPU belongs to a CPU class. Default: the best that loads.
    intra_op_threads
        As for :class:`~edge_runtime.predictor.Predictor` (default: ONNX Runtime's
        choice): measure the way the device serves.

    Returns
    -------
    DeviceProfile
        With ``latency_ms`` rounded to 0.1 µs.

    Raises
    ------
    ConfigError
        If an argument is invalid, ``provider`` does not load, or a model's input is not
        a float tensor of fixed non-batch shape.
    DataError
        If a model file is missing or ONNX Runtime cannot load it.
    """
    from edge_runtime.latency import time_session_runs
    from edge_runtime.providers import open_session

    if not isinstance(models, Mapping) or not 1 <= len(models) <= MAX_ARTEFACTS:
        raise ConfigError(f"models must map 1 to {MAX_ARTEFACTS} artefact names to ONNX files")
    paths = {_check_name("a model name", name): Path(path) for name, path in models.items()}
    if isinstance(runs, bool) or not isinstance(runs, int) or not _MIN_RUNS <= runs <= _MAX_RUNS:
        raise ConfigError(f"runs must be an int in [{_MIN_RUNS}, {_MAX_RUNS}], got {runs!r:.40}")
    first_name, first_path = next(iter(paths.items()))
    loaded, first_session = _loaded_providers(first_path, provider, intra_op_threads)
    serving = loaded[0]
    sessions: dict[str, Any] = {first_name: first_session}
    for name, path in paths.items():
        if name not in sessions:
            sessions[name] = open_session(
                path, preference=(serving,), require=serving, intra_op_threads=intra_op_threads
            ).session
    inputs = {name: _one_input(session, paths[name]) for name, session in sessions.items()}

    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():
        time_session_runs(session, inputs[name], _WARMUP_RUNS)
    while (done := len(samples[first_name])) < runs:
        block = min(_BLOCK_RUNS, runs - done)
        for name, session in sessions.items():  # each block starts with an untimed run
            samples[name].extend(time_session_runs(session, inputs[name], block))
    latency = {name: round(statistics.median(times) * 1e3, 4) for name, times in samples.items()}
    profile = DeviceProfile(
        providers=tuple(item.value for item in loaded),
        memory_mb=total_memory_mb(),
        cpu_features=read_cpu_features(),
        latency_ms=latency,
    )
    logger.info(
        "device profile: class %s on %s, p50 ms %s", profile.device_class, serving.value, latency
    )
    return profile
