"""Reference statistics shipped with a model (``drift-reference.json``) for drift detection.

See :mod:`edge_runtime.drift` for the detector that reads them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from edge_runtime.drift_stats import finite_array
from fedge.errors import ConfigError

__all__ = ["REFERENCE_ARTEFACT_NAME", "FeatureMap", "ReferenceStats"]

REFERENCE_ARTEFACT_NAME = "drift-reference.json"
_FORMAT = "fedge/drift-reference/v1"
_REFERENCE_KEYS = frozenset(
    {"format", "feature_map", "pool_grid", "input_shape", "num_embedding_features"}
    | {"sample", "bin_edges", "bin_counts"}
)
_SIGNIFICANT_DIGITS = 7  # what the artefact keeps of each float: halves its size


class FeatureMap(Enum):
    """How :class:`ReferenceStats` reduces one input to features."""

    AVERAGE_POOL = "average-pool"  # (C, H, W) or (H, W) images -> grid x grid cell means
    IDENTITY = "identity"  # inputs flattened as given (pass your own projection here)


def _rounded(values: np.ndarray) -> np.ndarray:
    flat = [float(f"{value:.{_SIGNIFICANT_DIGITS}g}") for value in values.ravel().tolist()]
    return np.asarray(flat, dtype=np.float64).reshape(values.shape)


def _check_layout(feature_map: object, pool_grid: object, shape: tuple[int, ...]) -> None:
    if not isinstance(feature_map, FeatureMap):
        raise ConfigError(f"feature_map must be a FeatureMap, got {feature_map!r:.40}")
    if not shape or not all(type(d) is int and d >= 1 for d in shape):
        raise ConfigError(f"input_shape must be positive ints, got {shape!r:.60}")
    if type(pool_grid) is not int or pool_grid < 1:
        raise ConfigError(f"pool_grid must be an int >= 1, got {pool_grid!r:.40}")
    if feature_map is FeatureMap.AVERAGE_POOL and (
        len(shape) not in {2, 3} or shape[-1] % pool_grid or shape[-2] % pool_grid
    ):
        raise ConfigError(
            "average pooling needs (C, H, W) or (H, W) inputs with H and W divisible by "
            f"pool_grid={pool_grid}, got input shape {shape}"
        )


def _reduce(batch: np.ndarray, feature_map: FeatureMap, grid: int) -> np.ndarray:
    if feature_map is FeatureMap.AVERAGE_POOL:
        height, width = batch.shape[-2:]
        cells = batch.reshape(len(batch), -1, grid, height // grid, grid, width // grid)
        return np.asarray(cells.mean(axis=(1, 3, 5)).reshape(len(batch), grid * grid))
    return batch.reshape(len(batch), -1)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ReferenceStats:
    """What a detector compares against: a per-feature sample and PSI bins.

    ``sample`` is (features, S), each row sorted; ``bin_edges`` (features, bins - 1)
    are the reference deciles (for 10 bins), non-decreasing; ``bin_counts``
    (features, bins) count the reference inputs per bin (``x <= edge`` goes left).
    """

    feature_map: FeatureMap
    pool_grid: int
    input_shape: tuple[int, ...]
    num_embedding_features: int
    sample: np.ndarray
    bin_edges: np.ndarray
    bin_counts: np.ndarray

    def __post_init__(self) -> None:
        _check_layout(self.feature_map, self.pool_grid, self.input_shape)
        embeddings = self.num_embedding_features
        if type(embeddings) is not int or embeddings < 0:
            raise ConfigError(f"num_embedding_features must be an int >= 0, got {embeddings!r:.40}")
        features = self.num_input_features + embeddings
        sample = finite_array("reference sample values", self.sample, 2)
        edges = np.asarray(self.bin_edges, dtype=np.float64)
        counts = np.asarray(self.bin_counts)
        if sample.shape[0] != features or sample.shape[1] < 2:
            raise ConfigError(f"sample must be ({features}, >= 2), got {sample.shape}")
        if counts.ndim != 2 or counts.shape[0] != features or counts.shape[1] < 2:
            raise ConfigError(f"bin_counts must be ({features}, >= 2), got {counts.shape}")
        if edges.shape != (features, counts.shape[1] - 1) or not np.isfinite(edges).all():
            raise ConfigError(
                f"bin_edges must be finite, ({features}, bins - 1), got {edges.shape}"
            )
        if (np.diff(sample, axis=1) < 0).any() or (np.diff(edges, axis=1) < 0).any():
            raise ConfigError("each row of sample and bin_edges must be sorted")
        if counts.dtype.kind not in "iu" or (counts < 0).any() or (counts.sum(axis=1) < 1).any():
            raise ConfigError("bin_counts must be non-negative integers")
        if len(set(counts.sum(axis=1).tolist())) != 1:
            raise ConfigError("every feature's bin_counts must sum to the same reference size")
        for name, array in (("sample", sample), ("bin_edges", edges), ("bin_counts", counts)):
            frozen = array.copy()
            frozen.flags.writeable = False
            object.__setattr__(self, name, frozen)

    @property
    def num_input_features(self) -> int:
        """How many features the inputs themselves contribute (before embeddings)."""
        if self.feature_map is FeatureMap.AVERAGE_POOL:
            return self.pool_grid * self.pool_grid
        return math.prod(self.input_shape)

    @property
    def num_features(self) -> int:
        """How many features each input is reduced to, embeddings included."""
        return self.num_input_features + self.num_embedding_features

    @property
    def reference_fractions(self) -> np.ndarray:
        """Return the fraction of reference inputs in each PSI bin, (features, bins)."""
        return np.asarray(self.bin_counts / self.bin_counts.sum(axis=1, keepdims=True))

    def features(self, inputs: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Reduce a batch of inputs (and embeddings) to an (N, features) float64 array.

        Raises
        ------
        ConfigError
            If the batch is empty, has the wrong shape, holds NaN or infinity, or its
            embeddings are missing, unexpected or of the wrong width.
        """
        batch = finite_array("inputs", inputs, 1 + len(self.input_shape))
        if batch.shape[1:] != self.input_shape:
            raise ConfigError(
                f"expected inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {batch.shape}"
            )
        reduced = _reduce(batch, self.feature_map, self.pool_grid)
        if self.num_embedding_features == 0:
            if embeddings is not None:
                raise ConfigError("this reference was fit without embeddings; pass none")
            return np.asarray(reduced)
        if embeddings is None:
            raise ConfigError(
                f"this reference was fit with {self.num_embedding_features} embedding "
                "features; pass embeddings"
            )
        extra = finite_array("embeddings", embeddings, 2)
        if extra.shape != (len(batch), self.num_embedding_features):
            raise ConfigError(
                f"expected embeddings of shape ({len(batch)}, {self.num_embedding_features}), "
                f"got {extra.shape}"
            )
        return np.concatenate([reduced, extra], axis=1)

    @classmethod
    def fit(
        cls,
        inputs: np.ndarray,
        *,
        features: FeatureMap = FeatureMap.AVERAGE_POOL,
        pool_grid: int = 7,
        embeddings: np.ndarray | None = None,
        bins: int = 10,
        sample_size: int = 1000,
        rng: np.random.Generator | None = None,
    ) -> ReferenceStats:
        """Summarise reference inputs (e.g. the training set) for drift detection.

        Parameters
        ----------
        inputs
            (N, ...) reference inputs, e.g. (N, 1, 28, 28) float images.
        features
            How each input becomes features; use ``IDENTITY`` with inputs you projected.
        pool_grid
            Side of the average-pooling grid (7: a 28 x 28 image gives 49 features).
        embeddings
            Optional (N, E) per-input model outputs (e.g. logits) appended as features.
        bins
            PSI bins per feature, cut at the reference quantiles (10: deciles).
        sample_size
            How many reference rows the KS test keeps (drawn without replacement).
        rng
            Draws that sample; ``default_rng(0)`` (a reproducible artefact) if None.

        Returns
        -------
        ReferenceStats
            The summary; ship :meth:`canonical_bytes` as ``drift-reference.json``.

        Raises
        ------
        ConfigError
            If an argument is out of range, or the inputs are fewer than ``bins``,
            malformed or not finite.
        """
        if not 2 <= bins <= 100:
            raise ConfigError(f"bins must be in [2, 100], got {bins}")
        if sample_size < 10:
            raise ConfigError(f"sample_size must be at least 10, got {sample_size}")
        batch = np.asarray(inputs)
        if batch.ndim < 2 or len(batch) < bins:
            raise ConfigError(
                f"need at least bins={bins} reference inputs, got shape {batch.shape}"
            )
        shape = tuple(int(d) for d in batch.shape[1:])
        _check_layout(features, pool_grid, shape)
        batch = finite_array("inputs", batch, batch.ndim)
        values = _reduce(batch, features, pool_grid)
        num_input_features = values.shape[1]
        if embeddings is not None:
            extra = finite_array("embeddings", embeddings, 2)
            if len(extra) != len(batch):
                raise ConfigError(f"need one embedding row per input, got {extra.shape}")
            values = np.concatenate([values, extra], axis=1)
        rng = np.random.default_rng(0) if rng is None else rng
        rows = rng.choice(len(values), size=min(sample_size, len(values)), replace=False)
        edges = _rounded(np.quantile(values, np.arange(1, bins) / bins, axis=0).T)
        counts = np.stack(
            [
                np.bincount(np.searchsorted(row, column, side="left"), minlength=bins)
                for row, column in zip(edges, values.T, strict=True)
            ]
        )
        return cls(
            feature_map=features,
            pool_grid=pool_grid,
            input_shape=shape,
            num_embedding_features=values.shape[1] - num_input_features,
            sample=_rounded(np.sort(values[rows].T, axis=1)),
            bin_edges=edges,
            bin_counts=counts.astype(np.int64),
        )

    def to_json(self) -> dict[str, Any]:
        """Return the reference as plain JSON values (floats to 7 significant digits)."""
        return {
            "format": _FORMAT,
            "feature_map": self.feature_map.value,
            "pool_grid": self.pool_grid,
            "input_shape": list(self.input_shape),
            "num_embedding_features": self.num_embedding_features,
            "sample": self.sample.tolist(),
            "bin_edges": self.bin_edges.tolist(),
            "bin_counts": self.bin_counts.tolist(),
        }

    def canonical_bytes(self) -> bytes:
        """Return the artefact's bytes: sorted-key, compact, ASCII JSON."""
        return json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode("ascii")

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ReferenceStats:
        """Parse and validate a reference read from disk or the network.

        Raises
        ------
        ConfigError
            If a key is missing or unknown, or any field is malformed or inconsistent.
        """
        if not isinstance(raw, Mapping) or set(raw) != _REFERENCE_KEYS:
            keys = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
            raise ConfigError(
                f"a drift reference needs exactly the keys {sorted(_REFERENCE_KEYS)}, got {keys}"
            )
        if raw["format"] != _FORMAT:
            raise ConfigError(f"unsupported drift reference format {raw['format']!r:.40}")
        try:
            feature_map = FeatureMap(raw["feature_map"])
        except ValueError:
            raise ConfigError(f"unknown feature_map {raw['feature_map']!r:.40}") from None
        if not isinstance(raw["input_shape"], list):
            raise ConfigError("input_shape must be a JSON array")
        arrays = []
        for key in ("sample", "bin_edges", "bin_counts"):
            rows = raw[key]
            if not isinstance(rows, list) or not all(
                isinstance(row, list)
                and all(type(v) is (int if key == "bin_counts" else float) for v in row)
                for row in rows
            ):
                kind = "ints" if key == "bin_counts" else "floats"
                raise ConfigError(f"{key} must be a JSON array of arrays of {kind}")
            try:
                arrays.append(np.array(rows, dtype=np.int64 if key == "bin_counts" else float))
            except (ValueError, OverflowError):
                raise ConfigError(f"{key} rows must all have the same length") from None
        return cls(
            feature_map=feature_map,
            pool_grid=raw["pool_grid"],
            input_shape=tuple(raw["input_shape"]),
            num_embedding_features=raw["num_embedding_features"],
            sample=arrays[0],
            bin_edges=arrays[1],
            bin_counts=arrays[2],
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceStats:
        """Parse a ``drift-reference.json`` artefact's bytes (see :meth:`from_json`)."""
        try:
            raw = json.loads(data, parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"a drift reference must be JSON: {error}") from None
        return cls.from_json(raw)


def _reject_constant(name: str) -> None:
    raise ConfigError(f"a drift reference may not contain {name}")
