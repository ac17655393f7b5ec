"""Detect input drift on a device: per-feature KS tests and PSI against a reference.

:meth:`ReferenceStats.fit` reduces each reference input to a small feature vector
(average-pooled images, or the inputs as given, plus optional ``embeddings`` such as
logits), keeps a sorted per-feature sample for the Kolmogorov-Smirnov test and decile
bins for the population stability index, and ships as ``drift-reference.json``.
:class:`DriftDetector` compares a sliding window of live inputs with it.

Notes
-----
The two-sample KS p-value is Kolmogorov's limiting distribution evaluated at Stephens'
finite-sample statistic ``(sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D`` with
``ne = n m / (n + m)`` (Stephens 1970, JRSS B 32:115; Press et al., *Numerical Recipes*
3rd ed. §14.3.3); it is accurate to a few per cent once ``ne`` exceeds about 4. Each
feature is one test, so the family-wise error is held at ``alpha`` by Bonferroni or
Holm's step-down (Holm 1979, Scand. J. Statist. 6:65); both stay valid however the
features are correlated. Ties (e.g. an always-black image corner) only make KS
conservative. PSI uses the reference deciles as bins and the customary reading
(< 0.1 stable, 0.1-0.25 moderate, >= 0.25 major shift; Siddiqi 2006, *Credit Risk
Scorecards*, ch. 8); empty bins are floored at ``psi_epsilon``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import numpy as np

from edge_runtime._json import utc_now as _utc_now
from edge_runtime.drift_reference import REFERENCE_ARTEFACT_NAME, FeatureMap, ReferenceStats
from edge_runtime.drift_stats import (
    Correction,
    kolmogorov_sf,
    ks_2samp_asymptotic,
    ks_p_values,
    ks_statistics,
    population_stability_index,
    psi_rows,
    rejected_features,
)
from fedge.errors import ConfigError

__all__ = [
    "REFERENCE_ARTEFACT_NAME",
    "Correction",
    "DriftConfig",
    "DriftDetector",
    "DriftMethod",
    "DriftReport",
    "FeatureMap",
    "PsiLevel",
    "ReferenceStats",
    "kolmogorov_sf",
    "ks_2samp_asymptotic",
    "population_stability_index",
]

logger = logging.getLogger(__name__)


class DriftMethod(Enum):
    """Which statistic decides that a window drifted."""

    KS = "ks"
    PSI = "psi"
    KS_OR_PSI = "ks-or-psi"


class PsiLevel(Enum):
    """The customary reading of the largest per-feature PSI."""

    NONE = "none"
    MODERATE = "moderate"
    MAJOR = "major"


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftConfig:
    """How a :class:`DriftDetector` windows, tests and decides."""

    window: int = 500
    alpha: float = 0.01
    correction: Correction = Correction.BONFERRONI
    method: DriftMethod = DriftMethod.KS
    psi_moderate: float = 0.1
    psi_major: float = 0.25
    psi_epsilon: float = 1e-4

    def __post_init__(self) -> None:
        if type(self.window) is not int or self.window < 10:
            raise ConfigError(f"window must be an int >= 10, got {self.window!r:.40}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if not isinstance(self.correction, Correction):
            raise ConfigError(f"correction must be a Correction, got {self.correction!r:.40}")
        if not isinstance(self.method, DriftMethod):
            raise ConfigError(f"method must be a DriftMethod, got {self.method!r:.40}")
        if not 0 < self.psi_moderate < self.psi_major:
            raise ConfigError(
                f"need 0 < psi_moderate < psi_major, got {self.psi_moderate} and {self.psi_major}"
            )
        if not 0 < self.psi_epsilon <= 0.01:
            raise ConfigError(f"psi_epsilon must be in (0, 0.01], got {self.psi_epsilon}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftReport:
    """The verdict on one window: summary statistics only, never the inputs."""

    drifted: bool
    method: DriftMethod
    ks_max: float
    min_p_value: float
    features_flagged: tuple[int, ...]
    psi_max: float
    psi_mean: float
    psi_level: PsiLevel
    window_size: int
    at: datetime

    def to_event(self) -> dict[str, Any]:
        """Return the report as a JSON telemetry event (``kind`` ``"drift.report"``)."""
        return {
            "kind": "drift.report",
            "drifted": self.drifted,
            "method": self.method.value,
            "ks_max": round(self.ks_max, 6),
            "min_p_value": float(f"{self.min_p_value:.6g}"),
            "features_flagged": list(self.features_flagged),
            "psi_max": round(self.psi_max, 6),
            "psi_mean": round(self.psi_mean, 6),
            "psi_level": self.psi_level.value,
            "window_size": self.window_size,
            "at": self.at.isoformat(),
        }


class DriftDetector:
    """Compare a sliding window of live inputs with a :class:`ReferenceStats`.

    Parameters
    ----------
    reference
        What the inputs should look like.
    config
        Window, significance level, correction and decision rule.
    on_drift
        Called with each drifted report (e.g. to request retraining); its errors propagate.
    clock
        Returns the timezone-aware time stamped on reports.
    """

    def __init__(
        self,
        reference: ReferenceStats,
        config: DriftConfig | None = None,
        *,
        on_drift: Callable[[DriftReport], None] | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not isinstance(reference, ReferenceStats):
            raise ConfigError(f"reference must be a ReferenceStats, got {type(reference).__name__}")
        config = DriftConfig() if config is None else config
        if not isinstance(config, DriftConfig):
            raise ConfigError(f"config must be a DriftConfig, got {type(config).__name__}")
        self._reference = reference
        self._config = config
        self._on_drift = on_drift
        self._clock = clock
        self._window = np.empty((config.window, reference.num_features))
        self._filled = 0
        self._position = 0

    @property
    def filled(self) -> int:
        """How many inputs the window holds (at most ``config.window``)."""
        return self._filled

    def reset(self) -> None:
        """Empty the window (e.g. after a new model and reference are installed)."""
        self._filled = self._position = 0

    def update(self, batch: np.ndarray, *, embeddings: np.ndarray | None = None) -> None:
        """Add a batch of inputs to the window, evicting the oldest once it is full.

        Raises
        ------
        ConfigError
            As :meth:`ReferenceStats.features`; nothing is added then.
        """
        values = self._reference.features(batch, embeddings)[-self._config.window :]
        slots = (self._position + np.arange(len(values))) % self._config.window
        self._window[slots] = values
        self._position = int(slots[-1] + 1) % self._config.window
        self._filled = min(self._filled + len(values), self._config.window)

    def check(self) -> DriftReport | None:
        """Test the current window; None until it is full."""
        if self._filled < self._config.window:
            return None
        return self._judge(self._window)

    def evaluate(self, batch: np.ndarray, *, embeddings: np.ndarray | None = None) -> DriftReport:
        """Test one batch as a window of its own, leaving the sliding window alone.

        Raises
        ------
        ConfigError
            If the batch is empty or malformed (see :meth:`ReferenceStats.features`).
        """
        return self._judge(self._reference.features(batch, embeddings))

    def _judge(self, window: np.ndarray) -> DriftReport:
        config, reference = self._config, self._reference
        statistics = ks_statistics(reference.sample, window)
        p_values = ks_p_values(statistics, reference.sample.shape[1], len(window))
        ks_flagged = rejected_features(p_values, config.alpha, config.correction)
        counts = np.stack(
            [
                np.bincount(np.searchsorted(edges, column, side="left"), minlength=len(edges) + 1)
                for edges, column in zip(reference.bin_edges, window.T, strict=True)
            ]
        )
        psi = psi_rows(reference.reference_fractions, counts / len(window), config.psi_epsilon)
        psi_flagged = np.flatnonzero(psi >= config.psi_major)
        flagged = {
            DriftMethod.KS: ks_flagged,
            DriftMethod.PSI: psi_flagged,
            DriftMethod.KS_OR_PSI: np.union1d(ks_flagged, psi_flagged),
        }[config.method]
        psi_max = float(psi.max())
        level = (
            PsiLevel.MAJOR
            if psi_max >= config.psi_major
            else PsiLevel.MODERATE
            if psi_max >= config.psi_moderate
            else PsiLevel.NONE
        )
        at = self._clock()
        if at.utcoffset() is None:
            raise ConfigError("the drift clock must return timezone-aware datetimes")
        report = DriftReport(
            drifted=bool(len(flagged)),
            method=config.method,
            ks_max=float(statistics.max()),
            min_p_value=float(p_values.min()),
            features_flagged=tuple(int(index) for index in flagged),
            psi_max=psi_max,
            psi_mean=float(psi.mean()),
            psi_level=level,
            window_size=len(window),
            at=at,
        )
        if report.drifted:
            logger.warning(
                "input drift: %d of %d features flagged (ks_max=%.3f, min p=%.2g, psi_max=%.3f)",
                len(flagged),
                len(psi),
                report.ks_max,
                report.min_p_value,
                psi_max,
            )
            if self._on_drift is not None:
                self._on_drift(report)
        else:
            logger.debug("no drift (ks_max=%.3f, psi_max=%.3f)", report.ks_max, psi_max)
        return report
