"""Discrete noise for distributed differential privacy: the discrete Gaussian, from a CSPRNG.

Each client of a distributed-DP round adds integer noise to its quantised
update before masking, so the sum the server unmasks is already private
(Kairouz, Liu and Steinke, ICML 2021). The sampler is Algorithm 3 of Canonne,
Kamath and Steinke (NeurIPS 2020): draw Y from a discrete Laplace of scale
t = floor(sigma) + 1 and keep it with probability
exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)); what is kept is exactly
N_Z(0, sigma^2), P[Y = y] proportional to exp(-y^2 / (2 sigma^2)).

Notes
-----
Vectorised with numpy: uniforms are 53-bit floats from AES-256-CTR keyed by
the given :class:`RandomSource` (the OS CSPRNG in production), and the
geometric and Bernoulli draws use float64 ``log``/``exp``. That makes the
sampler exact up to double rounding (relative error ~1e-16 in each
probability), not bit-exact like the rational-arithmetic original, which costs
microseconds per sample in Python; the difference is far below any privacy
accounting slack. Never ``random`` or ``numpy.random``: their outputs are
predictable, and predictable noise is no noise.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.prg import SEED_BYTES, expand_mask
from secure_agg.randomness import RandomSource

__all__ = ["discrete_gaussian", "discrete_gaussian_variance", "gaussian", "uniform53"]

_MAX_SIGMA = 2.0**50  # samples stay below 2^53, exact in float64
# sigma^2 must stay a normal double (a subnormal or zero sigma^2 turns the acceptance
# probability into NaN, and no draw would ever be kept).
_MIN_SIGMA = 2.0**-20
# Each batch keeps about a third of its draws or more: hundreds of batches in a row
# that keep nothing mean the arithmetic broke, not bad luck.
_MAX_BATCHES = 1000
_TWO_TO_MINUS_53 = 2.0**-53


def uniform53(rng: RandomSource, size: int) -> npt.NDArray[np.float64]:
    """Return ``size`` floats uniform on [0, 1) with 53 random bits each."""
    words = expand_mask(rng.random_bytes(SEED_BYTES), size, np.dtype(np.uint64))
    return (words >> np.uint64(11)).astype(np.float64) * _TWO_TO_MINUS_53


def gaussian(std: float, size: int, rng: RandomSource) -> npt.NDArray[np.float64]:
    """Return ``size`` independent samples of N(0, std^2) (Box-Muller on 53-bit uniforms).

    For central and local DP, where the noise is added to floats. The samples
    are float64, so their lowest bits carry the usual floating-point artefacts
    (Mironov, CCS 2012); where that matters, add integer noise
    (:func:`discrete_gaussian`) to a quantised value instead.

    Raises
    ------
    ConfigError
        If ``std`` or ``size`` is out of range.
    """
    if not (math.isfinite(std) and std > 0):
        raise ConfigError(f"std must be a finite number > 0, got {std}")
    if size < 0:
        raise ConfigError(f"size must be >= 0, got {size}")
    half = (size + 1) // 2
    u = uniform53(rng, 2 * half).reshape(2, half)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u is in (0, 1]: no log(0)
    angle = 2.0 * np.pi * u[1]
    out = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:size]
    out *= std
    return out


def discrete_gaussian(sigma: float, size: int, rng: RandomSource) -> npt.NDArray[np.int64]:
    """Return ``size`` independent samples of the discrete Gaussian N_Z(0, sigma^2).

    Parameters
    ----------
    sigma
        The scale, in [2^-20, 2^50].
    size
        How many samples, >= 0.
    rng
        The source of randomness (CSPRNG in production, seeded in tests).

    Raises
    ------
    ConfigError
        If ``sigma`` or ``size`` is out of range.
    """
    if not (math.isfinite(sigma) and _MIN_SIGMA <= sigma <= _MAX_SIGMA):
        raise ConfigError(f"sigma must be a finite number in [2^-20, 2^50], got {sigma}")
    if size < 0:
        raise ConfigError(f"size must be >= 0, got {size}")
    t = math.floor(sigma) + 1
    out = np.empty(size, dtype=np.int64)
    filled = 0
    for _ in range(_MAX_BATCHES):
        if filled >= size:
            break
        need = size - filled
        # About 3/4 of the draws are kept for sigma >= 3 and over 1/3 below (measured);
        # draw a little more than that needs, and let the loop top up after an unlucky batch.
        batch = int(need / (0.7 if sigma >= 3 else 0.33)) + 64
        u = uniform53(rng, 3 * batch).reshape(3, batch)
        # Geometric G with P[G = k] = e^(-k/t) (1 - e^(-1/t)), by inversion (1 - u is in (0, 1]).
        magnitude = np.floor(-t * np.log1p(-u[0]))
        negative = u[1] < 0.5
        # The discrete Laplace: +G or -G, rejecting "-0" so zero is not counted twice.
        keep = ~(negative & (magnitude == 0))
        accept = np.exp(-((magnitude - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        keep &= u[2] < accept
        values = np.where(negative, -magnitude, magnitude)[keep].astype(np.int64)
        take = min(need, values.shape[0])
        out[filled : filled + take] = values[:take]
        filled += take
    if filled < size:  # pragma: no cover - needs about 10^-400 luck
        raise ConfigError(f"the discrete Gaussian sampler kept too few draws at sigma {sigma}")
    return out


def discrete_gaussian_variance(sigma: float, *, terms: int = 0) -> float:
    """Return the exact variance of N_Z(0, sigma^2) by summing its pmf (sigma <= 2^20).

    The variance is at most sigma^2 and equals it to within 1e-12 relative for
    sigma >= 1 (Canonne et al., Corollary 9); useful to calibrate noise for small sigma.
    """
    if not (math.isfinite(sigma) and 0 < sigma <= 2.0**20):
        raise ConfigError(f"sigma must be a finite number in (0, 2^20], got {sigma}")
    bound = terms or math.ceil(40 * sigma) + 1
    k = np.arange(-bound, bound + 1, dtype=np.float64)
    weights = np.exp(-(k * k) / (2 * sigma * sigma))
    return float(np.sum(k * k * weights) / np.sum(weights))
