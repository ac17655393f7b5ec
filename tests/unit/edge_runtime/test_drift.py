"""Input drift detection: KS and PSI maths, detector behaviour, the reference artefact."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from scipy.special import kolmogorov
from scipy.stats import ks_2samp

from edge_runtime.drift import (
    Correction,
    DriftConfig,
    DriftDetector,
    DriftMethod,
    DriftReport,
    FeatureMap,
    PsiLevel,
    ReferenceStats,
    kolmogorov_sf,
    ks_2samp_asymptotic,
    population_stability_index,
)
from edge_runtime.drift_stats import rejected_features
from fedge.errors import ConfigError

WINDOW = 500
FIXED_TIME = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
# Each class lights a fixed set of 4 x 4 cells ("strokes") on a black 28 x 28 image.
STROKES = np.random.default_rng(99).random((10, 7, 7)) < 0.35


def make_images(
    rng: np.random.Generator,
    count: int,
    *,
    classes: tuple[int, ...] = tuple(range(10)),
    brightness: float = 0.0,
    noise: float = 0.0,
) -> np.ndarray:
    """Return (count, 1, 28, 28) float32 MNIST-like images in [0, 1]."""
    labels = rng.choice(classes, size=count)
    strokes = STROKES[labels].repeat(4, axis=1).repeat(4, axis=2)
    images = strokes * rng.uniform(0.6, 1.0, (count, 1, 1)) + rng.normal(0, 0.05, strokes.shape)
    images = images + brightness
    if noise:
        images = images + rng.normal(0, noise, strokes.shape)
    return np.asarray(np.clip(images, 0, 1)[:, None], dtype=np.float32)


@pytest.fixture(scope="module")
def reference() -> ReferenceStats:
    return ReferenceStats.fit(make_images(np.random.default_rng(0), 5000))


def detector(reference: ReferenceStats, **config: Any) -> DriftDetector:
    return DriftDetector(reference, DriftConfig(**config), clock=lambda: FIXED_TIME)


# --- the statistics ------------------------------------------------------------------


def test_kolmogorov_sf_matches_scipy_on_both_series() -> None:
    points = np.linspace(0.0, 4.0, 801)  # crosses the switch between the series at 1.18

    np.testing.assert_allclose(kolmogorov_sf(points), kolmogorov(points), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("reference_size", "sample_size", "shift", "discrete"),
    [
        (1000, 500, 0.0, False),
        (1000, 500, 0.15, False),
        (800, 300, 0.3, False),
        (500, 500, 0.2, True),
    ],
)
def test_ks_matches_scipy_ks_2samp_asymptotic(
    reference_size: int, sample_size: int, shift: float, discrete: bool
) -> None:
    rng = np.random.default_rng(reference_size + sample_size)
    reference = rng.normal(size=reference_size)
    sample = rng.normal(shift, size=sample_size)
    if discrete:  # ties in and across both samples
        reference, sample = np.round(reference * 2), np.round(sample * 2)

    statistic, p_value = ks_2samp_asymptotic(reference, sample)
    expected = ks_2samp(reference, sample, method="asymp")

    assert statistic == pytest.approx(expected.statistic, abs=1e-12)
    # scipy evaluates the exact one-sample law at n = round(nm / (n + m)); Stephens'
    # corrected limit law agrees within a few per cent down to p ~ 1e-5.
    assert p_value == pytest.approx(expected.pvalue, rel=0.08, abs=1e-9)


def test_psi_known_values() -> None:
    half = np.array([0.5, 0.5])

    assert population_stability_index(half, half) == 0.0
    assert population_stability_index(half, np.array([0.9, 0.1])) == pytest.approx(
        0.4 * np.log(0.9 / 0.5) + 0.4 * np.log(0.5 / 0.1)
    )
    # An empty bin is floored at epsilon instead of giving an infinite PSI.
    assert population_stability_index(half, np.array([1.0, 0.0]), epsilon=1e-4) == pytest.approx(
        0.5 * np.log(2) + (0.5 - 1e-4) * np.log(0.5 / 1e-4)
    )


def test_holm_rejects_at_least_what_bonferroni_rejects() -> None:
    p_values = np.array([0.02, 0.001, 0.5, 0.004])

    bonferroni = rejected_features(p_values, 0.04, Correction.BONFERRONI)  # each p <= 0.01
    holm = rejected_features(
        p_values, 0.04, Correction.HOLM
    )  # 0.001<=0.01, 0.004<=0.0133, 0.02<=0.02

    assert bonferroni.tolist() == [1, 3]
    assert holm.tolist() == [0, 1, 3]


# --- the detector ----------------------------------------------------------------------


def test_quiet_on_same_distribution_with_bounded_false_alarm_rate(
    reference: ReferenceStats,
) -> None:
    quiet = detector(reference)
    rng = np.random.default_rng(1)

    alarms = sum(quiet.evaluate(make_images(rng, WINDOW)).drifted for _ in range(100))

    # Bonferroni holds each window's family-wise false-alarm rate at <= alpha = 0.01 (ties
    # on the black background only make KS more conservative): measured 7 alarms in 1000
    # windows over 10 independently fitted references. Every window here meets the same
    # fixed reference sample, whose own luck moves the rate (7/400 = 1.75% for this
    # fixture), so the bound allows for up to 2 alpha: with p = 0.02, P(X >= 5) < 0.06 for
    # X ~ Binomial(100, p), and without the correction 44% of windows alarm, failing
    # loudly. This seed gives 1 alarm in 100.
    assert alarms <= 4


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param({"brightness": 0.15}, id="brightness+0.15"),
        pytest.param({"noise": 0.1}, id="gaussian-noise-0.1"),
        pytest.param({"classes": (0, 1, 2)}, id="class-mix-0-2"),
    ],
)
def test_fires_on_shifted_inputs(reference: ReferenceStats, shift: dict[str, Any]) -> None:
    loud = detector(reference)
    rng = np.random.default_rng(2)

    reports = [loud.evaluate(make_images(rng, WINDOW, **shift)) for _ in range(10)]

    assert all(report.drifted for report in reports)
    assert all(report.min_p_value < 1e-6 for report in reports)


def test_sliding_window_checks_when_full_and_calls_the_hook_on_drift(
    reference: ReferenceStats,
) -> None:
    fired: list[DriftReport] = []
    sliding = DriftDetector(reference, DriftConfig(window=WINDOW), on_drift=fired.append)
    rng = np.random.default_rng(3)

    sliding.update(make_images(rng, WINDOW - 1, brightness=0.15))
    assert sliding.check() is None  # not full yet
    sliding.update(make_images(rng, 1, brightness=0.15))
    drifted = sliding.check()
    sliding.update(make_images(rng, 2 * WINDOW))  # evicts every shifted input
    recovered = sliding.check()

    assert drifted is not None and drifted.drifted and drifted.window_size == WINDOW
    assert recovered is not None and not recovered.drifted
    assert fired == [drifted]
    assert sliding.filled == WINDOW
    sliding.reset()
    assert sliding.check() is None


def test_psi_method_grades_the_shift(reference: ReferenceStats) -> None:
    psi = detector(reference, method=DriftMethod.PSI)
    rng = np.random.default_rng(4)

    shifted = psi.evaluate(make_images(rng, WINDOW, brightness=0.15))
    same = psi.evaluate(make_images(rng, WINDOW))

    assert shifted.drifted and shifted.psi_level is PsiLevel.MAJOR and shifted.psi_max >= 0.25
    assert not same.drifted and same.psi_level is PsiLevel.NONE and same.psi_max < 0.1
    assert same.method is DriftMethod.PSI


def test_holm_flags_a_superset_of_bonferroni_on_a_mild_shift(reference: ReferenceStats) -> None:
    batch = make_images(np.random.default_rng(5), WINDOW, brightness=0.005)

    bonferroni = detector(reference).evaluate(batch).features_flagged
    holm = detector(reference, correction=Correction.HOLM).evaluate(batch).features_flagged

    # A shift this small is caught on some cells only (measured 19 and 21 of 49), so the
    # step-down visibly finds more than the single-step rule and never fewer.
    assert 0 < len(bonferroni) < len(holm) < 49
    assert set(bonferroni) < set(holm)


def test_embeddings_are_features_after_the_pooled_cells() -> None:
    rng = np.random.default_rng(6)
    images = make_images(rng, 2000)
    logits = rng.normal(size=(2000, 10))
    fitted = ReferenceStats.fit(images, embeddings=logits, sample_size=500)
    watcher = detector(fitted, window=200)

    report = watcher.evaluate(images[:200], embeddings=logits[:200] + np.eye(10)[3] * 1.0)

    assert fitted.num_features == 49 + 10
    assert report.drifted and report.features_flagged == (49 + 3,)


def test_identity_features_on_flat_inputs() -> None:
    rng = np.random.default_rng(7)
    fitted = ReferenceStats.fit(rng.normal(size=(3000, 4)), features=FeatureMap.IDENTITY)
    watcher = detector(fitted, window=300)

    shifted = rng.normal(size=(300, 4))
    shifted[:, 2] += 0.5

    assert watcher.evaluate(shifted).features_flagged == (2,)
    assert not watcher.evaluate(rng.normal(size=(300, 4))).drifted


def test_event_carries_statistics_only(reference: ReferenceStats) -> None:
    batch = make_images(np.random.default_rng(8), WINDOW, brightness=0.15)

    event = detector(reference).evaluate(batch).to_event()
    encoded = json.dumps(event, allow_nan=False)

    assert set(event) == {
        "kind",
        "drifted",
        "method",
        "ks_max",
        "min_p_value",
        "features_flagged",
        "psi_max",
        "psi_mean",
        "psi_level",
        "window_size",
        "at",
    }
    assert event["kind"] == "drift.report" and event["at"] == "2026-01-31T12:00:00+00:00"
    assert all(isinstance(index, int) for index in event["features_flagged"])
    assert len(encoded) < 600 < batch.nbytes  # 49 indices and a few scalars, no pixels


# --- the reference artefact ------------------------------------------------------------


def test_reference_round_trips_through_canonical_json(reference: ReferenceStats) -> None:
    data = reference.canonical_bytes()
    parsed = ReferenceStats.from_bytes(data)
    batch = make_images(np.random.default_rng(9), WINDOW, noise=0.05)

    assert parsed.canonical_bytes() == data
    assert ReferenceStats.from_json(json.loads(data)).to_json() == reference.to_json()
    assert detector(parsed).evaluate(batch) == detector(reference).evaluate(batch)
    assert len(data) < 700_000  # 49 x 1000 sample values at 7 significant digits
    assert not reference.sample.flags.writeable


def _mutated(reference: ReferenceStats, change: Callable[[dict[str, Any]], None]) -> bytes:
    raw = json.loads(reference.canonical_bytes())
    change(raw)
    return json.dumps(raw).encode()


def _unsort(raw: dict[str, Any]) -> None:
    raw["sample"][0][0], raw["sample"][0][-1] = raw["sample"][0][-1] + 1, raw["sample"][0][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.pop("sample"), "exactly the keys"),
        (lambda raw: raw.update(extra=1), "exactly the keys"),
        (lambda raw: raw.update(format="fedge/drift-reference/v0"), "unsupported drift reference"),
        (lambda raw: raw.update(feature_map="fft"), "unknown feature_map"),
        (lambda raw: raw.update(input_shape=28), "input_shape must be a JSON array"),
        (lambda raw: raw.update(input_shape=[1, 28, 0]), "input_shape must be positive ints"),
        (lambda raw: raw.update(pool_grid=5), "divisible by pool_grid=5"),
        (lambda raw: raw.update(pool_grid=True), "pool_grid must be an int"),
        (lambda raw: raw.update(num_embedding_features=-1), "num_embedding_features must be"),
        (lambda raw: raw.update(num_embedding_features=2), r"sample must be \(51, >= 2\)"),
        (_unsort, "must be sorted"),
        (lambda raw: raw["sample"][0].pop(), "same length"),
        (lambda raw: raw["bin_counts"][0].__setitem__(0, 1.5), "arrays of ints"),
        (
            lambda raw: raw["bin_counts"][0].__setitem__(0, raw["bin_counts"][0][0] + 1),
            "sum to the same reference size",
        ),
        (lambda raw: raw["bin_counts"][0].__setitem__(0, -1), "non-negative integers"),
        (lambda raw: raw["bin_edges"][0].append(2.0), "same length"),
        (
            lambda raw: raw.update(bin_edges=[row[:-1] for row in raw["bin_edges"]]),
            "bin_edges must be",
        ),
        (lambda raw: raw["sample"][1].__setitem__(0, "0.1"), "arrays of floats"),
    ],
)
def test_from_json_rejects_malformed_references(
    reference: ReferenceStats, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ReferenceStats.from_bytes(_mutated(reference, change))


def test_from_bytes_rejects_non_json_and_non_finite_values(reference: ReferenceStats) -> None:
    nan = reference.canonical_bytes().replace(b'"sample":[[', b'"sample":[[NaN,', 1)

    with pytest.raises(ConfigError, match="must be JSON"):
        ReferenceStats.from_bytes(b"\xff not json")
    with pytest.raises(ConfigError, match="may not contain NaN"):
        ReferenceStats.from_bytes(nan)
    with pytest.raises(ConfigError, match="exactly the keys"):
        ReferenceStats.from_bytes(b"[]")


# --- validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"bins": 1}, r"bins must be in \[2, 100\]"),
        ({"sample_size": 9}, "sample_size must be at least 10"),
        ({"pool_grid": 5}, "divisible by pool_grid=5"),
        ({"features": "average-pool"}, "feature_map must be a FeatureMap"),
        ({"embeddings": np.zeros((99, 3))}, "one embedding row per input"),
        ({"embeddings": np.full((100, 3), np.inf)}, "embeddings contain NaN or infinity"),
    ],
)
def test_fit_rejects_bad_arguments(arguments: dict[str, Any], message: str) -> None:
    images = make_images(np.random.default_rng(10), 100)

    with pytest.raises(ConfigError, match=message):
        ReferenceStats.fit(images, **arguments)


def test_fit_rejects_bad_inputs() -> None:
    images = make_images(np.random.default_rng(11), 100)
    images[3, 0, 5, 5] = np.nan

    with pytest.raises(ConfigError, match="inputs contain NaN or infinity"):
        ReferenceStats.fit(images)
    with pytest.raises(ConfigError, match="need at least bins=10 reference inputs"):
        ReferenceStats.fit(images[:9])
    with pytest.raises(ConfigError, match=r"\(C, H, W\) or \(H, W\) inputs"):
        ReferenceStats.fit(np.zeros((100, 49)))


@pytest.mark.parametrize(
    ("batch", "embeddings", "message"),
    [
        (np.zeros((5, 1, 28, 27)), None, r"expected inputs of shape \(N, 1, 28, 28\)"),
        (np.zeros((5, 28, 28)), None, r"non-empty 4-D array, got shape \(5, 28, 28\)"),
        (np.zeros((0, 1, 28, 28)), None, "non-empty 4-D array"),
        (np.full((5, 1, 28, 28), np.nan), None, "inputs contain NaN or infinity"),
        (np.zeros((5, 1, 28, 28)), np.zeros((5, 2)), "fit without embeddings"),
    ],
)
def test_detector_rejects_bad_batches_and_keeps_its_window(
    reference: ReferenceStats, batch: np.ndarray, embeddings: np.ndarray | None, message: str
) -> None:
    watcher = detector(reference, window=10)

    with pytest.raises(ConfigError, match=message):
        watcher.update(batch, embeddings=embeddings)
    with pytest.raises(ConfigError, match=message):
        watcher.evaluate(batch, embeddings=embeddings)
    assert watcher.filled == 0


def test_detector_requires_the_embeddings_it_was_fit_with() -> None:
    rng = np.random.default_rng(12)
    fitted = ReferenceStats.fit(
        rng.normal(size=(50, 3)), features=FeatureMap.IDENTITY, embeddings=rng.normal(size=(50, 2))
    )
    watcher = detector(fitted, window=10)

    with pytest.raises(ConfigError, match="fit with 2 embedding features; pass embeddings"):
        watcher.evaluate(np.zeros((4, 3)))
    with pytest.raises(ConfigError, match=r"expected embeddings of shape \(4, 2\)"):
        watcher.evaluate(np.zeros((4, 3)), embeddings=np.zeros((4, 3)))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"window": 9}, "window must be an int >= 10"),
        ({"window": 10.0}, "window must be an int >= 10"),
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\)"),
        ({"alpha": 1.0}, r"alpha must be in \(0, 1\)"),
        ({"correction": "holm"}, "correction must be a Correction"),
        ({"method": "ks"}, "method must be a DriftMethod"),
        ({"psi_moderate": 0.3}, "need 0 < psi_moderate < psi_major"),
        ({"psi_moderate": 0.0}, "need 0 < psi_moderate < psi_major"),
        ({"psi_epsilon": 0.0}, r"psi_epsilon must be in \(0, 0.01\]"),
        ({"psi_epsilon": 0.1}, r"psi_epsilon must be in \(0, 0.01\]"),
    ],
)
def test_config_rejects_out_of_range_values(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DriftConfig(**arguments)


def test_detector_rejects_wrong_argument_types(reference: ReferenceStats) -> None:
    with pytest.raises(ConfigError, match="reference must be a ReferenceStats"):
        DriftDetector(reference.to_json())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="config must be a DriftConfig"):
        DriftDetector(reference, {"window": 100})  # type: ignore[arg-type]


def test_statistics_reject_bad_samples() -> None:
    with pytest.raises(ConfigError, match="sample values must be a non-empty 1-D array"):
        ks_2samp_asymptotic(np.arange(5.0), np.array([]))
    with pytest.raises(ConfigError, match="reference values contain NaN or infinity"):
        ks_2samp_asymptotic(np.array([0.0, np.inf]), np.arange(5.0))
    with pytest.raises(ConfigError, match="reference values must be a non-empty 1-D array"):
        ks_2samp_asymptotic(np.zeros((2, 2)), np.arange(5.0))
    with pytest.raises(ConfigError, match=r"epsilon must be in \(0, 0.01\]"):
        population_stability_index(np.ones(2) / 2, np.ones(2) / 2, epsilon=0)
    with pytest.raises(ConfigError, match="fractions differ in shape"):
        population_stability_index(np.ones(2) / 2, np.ones(4) / 4)
    with pytest.raises(ConfigError, match="non-negative and sum to 1"):
        population_stability_index(np.ones(2) / 2, np.array([1.5, -0.5]))
    with pytest.raises(ConfigError, match="non-negative and sum to 1"):
        population_stability_index(np.ones(2), np.ones(2) / 2)


def test_detector_needs_a_timezone_aware_clock(reference: ReferenceStats) -> None:
    naive = DriftDetector(reference, clock=lambda: datetime(2026, 1, 31, 12, 0))

    with pytest.raises(ConfigError, match="clock must return timezone-aware datetimes"):
        naive.evaluate(make_images(np.random.default_rng(13), 20))
