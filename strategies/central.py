"""Client-level central and local differential privacy: clipping, Gaussian noise, adaptive clipping.

Central DP (McMahan et al., ICLR 2018) is for deployments that trust the
aggregator: every client clips its update to L2 norm C, the server averages
the clipped updates *unweighted* and adds N(0, (z C)^2) to their sum. One
client moves the sum by at most C, so each round is the Gaussian mechanism
with noise multiplier z (accounted by :mod:`strategies.accounting`).

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021)
moves C towards the ``target_quantile`` of the update norms: each client also
contributes the *centred* bit b - 1/2, b = [||update|| <= C]; the server adds
N(0, sigma_b^2) to the centred bits' sum, divides by the round's fixed
expected count n (the clients sampled, never the survivors) and adds 1/2:
b_mean = (sum (b_i - 1/2) + N(0, sigma_b^2)) / n + 1/2, then
C <- C exp(-eta (b_mean - gamma)), as TFF's quantile estimator does. The bits
are summed through secure aggregation, never sent in clear. Adding or
removing a client moves the centred sum by 1/2 (a raw bit would move it by 1),
so the count is a Gaussian mechanism of multiplier 2 sigma_b, and the updates
get z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2): together a Gaussian mechanism of
multiplier z (the paper's Theorem 1). With raw bits the same z_u would leave
the round at (z_u^-2 + sigma_b^-2)^(-1/2) < z.

Local DP: every client clips its update to C and adds N(0, (z C)^2) itself, so
what leaves the device is already private, whatever the server does. Two
updates of one client differ by up to 2C, so a round costs the client a
Gaussian mechanism of multiplier z / 2.

Every sample comes from :func:`secure_agg.noise.gaussian`, fed by a
:class:`secure_agg.randomness.RandomSource` (the OS CSPRNG in production).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.encoding import EncodingConfig, conditional_rounding_bound
from secure_agg.noise import gaussian
from secure_agg.randomness import RandomSource
from strategies.clipping import clip_l2
from strategies.records import check_noise_multiplier, checked_fields

__all__ = [
    "CDP_RECORD_KEY",
    "CENTRED_BITS_METRIC",
    "LDP_RECORD_KEY",
    "MAX_ROUNDING_INFLATION",
    "SENSITIVITY_METRIC",
    "UNCLIPPED_METRIC",
    "AdaptiveClipping",
    "CentralDpRound",
    "CentralDpSettings",
    "LocalDpSettings",
    "add_central_noise",
    "local_privatise",
    "next_clip",
    "secure_l2_bound",
]

CDP_RECORD_KEY: Final = "fedge.cdp"
LDP_RECORD_KEY: Final = "fedge.ldp"
UNCLIPPED_METRIC: Final = "fedge-unclipped"
# The secure aggregate reply's sum of the centred bits b - 1/2 (never one client's bit).
CENTRED_BITS_METRIC: Final = "fedge-unclipped-centred-sum"
# The secure aggregate reply's L2 sensitivity of one client (conditional rounding's bound).
SENSITIVITY_METRIC: Final = "fedge-l2-sensitivity"
# Rounding may cost at most this much noise: beyond it the ring is too narrow to be useful.
MAX_ROUNDING_INFLATION: Final = 1.5
_CDP_FIELDS: dict[str, type] = {"l2-clip": float, "noise-multiplier": float, "adaptive": bool}
_LDP_FIELDS: dict[str, type] = {"l2-clip": float, "noise-multiplier": float}


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveClipping:
    """How the clipping bound follows a quantile of the update norms.

    Parameters
    ----------
    target_quantile
        gamma, the fraction of updates that should fit the bound unclipped, in (0, 1).
    learning_rate
        eta of the geometric update C <- C exp(-eta (b_mean - gamma)), > 0.
    count_noise_std
        sigma_b, the noise on the sum of the bits; the paper suggests (expected
        clients) / 20. Must exceed z / 2.
    min_clip, max_clip
        Bounds the clip never leaves.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 5.0
    min_clip: float = 1e-3
    max_clip: float = 1e3

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        _positive("learning_rate", self.learning_rate)
        _positive("count_noise_std", self.count_noise_std)
        _positive("min_clip", self.min_clip)
        _positive("max_clip", self.max_clip)
        if self.min_clip > self.max_clip:
            raise ConfigError("min_clip must be <= max_clip")


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralDpSettings:
    """Client-level central DP of a run.

    Parameters
    ----------
    l2_clip
        C, the L2 bound of a client's update (the initial one when adaptive).
    noise_multiplier
        z, the round's noise multiplier as accounted.
    adaptive
        Move C towards a quantile of the norms (needs secure aggregation for the bits).
    """

    l2_clip: float
    noise_multiplier: float
    adaptive: AdaptiveClipping | None = None

    def __post_init__(self) -> None:
        _positive("l2_clip", self.l2_clip)
        check_noise_multiplier(self.noise_multiplier)
        if self.adaptive is not None:
            if 2 * self.adaptive.count_noise_std <= self.noise_multiplier:
                raise ConfigError(
                    "adaptive clipping needs count_noise_std > noise_multiplier / 2 "
                    f"(got {self.adaptive.count_noise_std} and {self.noise_multiplier})"
                )
            if not self.adaptive.min_clip <= self.l2_clip <= self.adaptive.max_clip:
                raise ConfigError("the initial l2_clip must lie in [min_clip, max_clip]")

    @property
    def update_noise_multiplier(self) -> float:
        """z_u, the multiplier of the noise on the updates (z without adaptive clipping)."""
        if self.adaptive is None:
            return self.noise_multiplier
        z, sigma_b = self.noise_multiplier, self.adaptive.count_noise_std
        return float((z**-2 - (2 * sigma_b) ** -2) ** -0.5)


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralDpRound:
    """What the server tells clients in a central-DP round (the ``fedge.cdp`` record)."""

    l2_clip: float
    noise_multiplier: float
    adaptive: bool

    def __post_init__(self) -> None:
        _positive("l2_clip", self.l2_clip)
        check_noise_multiplier(self.noise_multiplier)

    def to_fields(self) -> dict[str, float | bool]:
        """Return the flat fields of a Flower ConfigRecord."""
        return {
            "l2-clip": self.l2_clip,
            "noise-multiplier": self.noise_multiplier,
            "adaptive": self.adaptive,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CentralDpRound:
        """Validate fields from the network.

        Raises
        ------
        ConfigError
            If a field is missing, of the wrong type or out of range.
        """
        values = checked_fields(fields, _CDP_FIELDS, what="central-DP")
        return cls(
            l2_clip=cast(float, values["l2-clip"]),
            noise_multiplier=cast(float, values["noise-multiplier"]),
            adaptive=cast(bool, values["adaptive"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalDpSettings:
    """Local DP: each client clips to ``l2_clip`` and adds N(0, (z C)^2) before sending.

    The ``fedge.ldp`` record carries the same two fields.
    """

    l2_clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        _positive("l2_clip", self.l2_clip)
        check_noise_multiplier(self.noise_multiplier)

    @property
    def accounted_noise_multiplier(self) -> float:
        """Z / 2: two updates of one client may differ by 2C."""
        return self.noise_multiplier / 2

    def to_fields(self) -> dict[str, float]:
        """Return the flat fields of a Flower ConfigRecord."""
        return {"l2-clip": self.l2_clip, "noise-multiplier": self.noise_multiplier}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> LocalDpSettings:
        """Validate fields from the network.

        Raises
        ------
        ConfigError
            If a field is missing, of the wrong type or out of range.
        """
        values = checked_fields(fields, _LDP_FIELDS, what="local-DP")
        return cls(
            l2_clip=cast(float, values["l2-clip"]),
            noise_multiplier=cast(float, values["noise-multiplier"]),
        )


def secure_l2_bound(l2_clip: float, dimension: int, encoding: EncodingConfig) -> float:
    """Return one client's L2 sensitivity in a central-DP round under secure aggregation.

    Stochastic rounding to the ring can push a C-clipped update past C (each
    coordinate moves by up to one quantisation step); clients round
    conditionally (:func:`secure_agg.encoding.encode` with ``l2_bound``) so
    their contribution stays within B = :func:`conditional_rounding_bound`, and
    the server's noise is z * B, not z * C: the rounding error is inside the
    accounted sensitivity.

    Raises
    ------
    ConfigError
        If B exceeds ``MAX_ROUNDING_INFLATION`` * C (the ring is too narrow).
    """
    bound = conditional_rounding_bound(l2_clip, dimension, encoding)
    if bound > MAX_ROUNDING_INFLATION * l2_clip:
        raise ConfigError(
            f"a {encoding.ring_bits}-bit ring rounds a {dimension}-value update to "
            f"{bound / l2_clip:.2f}x its clip (more than {MAX_ROUNDING_INFLATION}x): "
            "widen the ring"
        )
    return bound


def add_central_noise(
    mean_update: npt.NDArray[np.floating],
    *,
    l2_clip: float,
    noise_multiplier: float,
    num_clients: int,
    rng: RandomSource,
) -> npt.NDArray[np.float64]:
    """Return the mean of ``num_clients`` clipped updates plus N(0, (z C / n)^2) per coordinate.

    That is the noise N(0, (z C)^2) on the sum, divided like the sum.

    Raises
    ------
    ConfigError
        If a parameter is out of range or the mean holds NaN or infinity.
    """
    _positive("l2_clip", l2_clip)
    check_noise_multiplier(noise_multiplier)
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    flat = np.asarray(mean_update, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ConfigError("the mean update holds NaN or infinite values")
    std = noise_multiplier * l2_clip / num_clients
    return flat + gaussian(std, flat.shape[0], rng)


def next_clip(
    clip: float,
    *,
    centred_sum: float,
    expected_clients: int,
    adaptive: AdaptiveClipping,
    rng: RandomSource,
) -> tuple[float, float]:
    """Return the next round's clip and the noisy fraction of unclipped updates it used.

    ``centred_sum`` is the secure sum of the clients' centred bits b - 1/2,
    b = [||update|| <= C]; ``expected_clients`` is the round's fixed count (the
    clients sampled), the denominator whatever the number that survived.
    """
    if expected_clients < 1:
        raise ConfigError(f"expected_clients must be >= 1, got {expected_clients}")
    half = expected_clients / 2
    if not (math.isfinite(centred_sum) and -half - 0.5 <= centred_sum <= half + 0.5):
        raise ConfigError(f"impossible sum of centred bits {centred_sum}")
    noisy = centred_sum + float(gaussian(adaptive.count_noise_std, 1, rng)[0])
    fraction = noisy / expected_clients + 0.5
    updated = clip * math.exp(-adaptive.learning_rate * (fraction - adaptive.target_quantile))
    return min(max(updated, adaptive.min_clip), adaptive.max_clip), fraction


def local_privatise(
    update: npt.NDArray[np.floating], settings: LocalDpSettings, rng: RandomSource
) -> npt.NDArray[np.float64]:
    """Clip ``update`` to ``settings.l2_clip`` and add N(0, (z C)^2) to every coordinate.

    Raises
    ------
    ConfigError
        If the update holds NaN or infinite values.
    """
    clipped = clip_l2(update, settings.l2_clip).update
    std = settings.noise_multiplier * settings.l2_clip
    return clipped + gaussian(std, clipped.shape[0], rng)
