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
Three samplers, all keyed by the given :class:`RandomSource` (the OS CSPRNG in
production) through AES-256-CTR:

- For sigma <= 512 (every distributed-DP ring up to 16 bits in practice), an
  inversion table: the cumulative distribution of N_Z(0, sigma^2) on
  [-L, L], L = ceil(12 sigma) + 1, computed once per sigma in 40-digit decimal
  arithmetic and rounded to 64-bit integers; each sample is one uniform 64-bit
  word, located among the thresholds by a 2^16-bucket guide table read with the
  word's top 16 bits (the low 48 are drawn, and a binary search run, only for the
  few words whose bucket holds a threshold). Its
  statistical distance from N_Z(0, sigma^2) is at most
  (2L + 1) 2^-65 + P[|Y| > L] per sample (:func:`table_statistical_distance`:
  4e-17 at sigma 65, 3.4e-16 at 512): a million samples are within 4e-10 of
  exact, far below the delta of any accounting here.
- Above, up to ~10^13, convolution (Peikert 2010; Micciancio and Walter 2017): a
  sample is z Y + X with X drawn from the table at 512 (or sigma/2) and Y, recursively,
  of the scale that makes z^2 s_Y^2 + s_X^2 = sigma^2, down to a table-served base
  (three levels at sigma 2.4e7, a 32-bit ring's). With the smoothing scale
  s_Y s_X / sigma at least 4 at every level, each level is within 1e-137 of exact
  (:func:`convolution_statistical_distance`: the table draws' distances dominate,
  ~1e-15 a sample); four times the rejection sampler's speed or more.
- Above that, the rejection sampler of Canonne, Kamath and Steinke (Algorithm 3):
  53-bit uniforms, and the geometric and Bernoulli draws in float64
  ``log``/``exp``, so exact up to double rounding (relative error ~1e-16 in each
  probability), not bit-exact like the rational-arithmetic original, which costs
  microseconds per sample in Python.

Never ``random`` or ``numpy.random``: their outputs are predictable, and
predictable noise is no noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, localcontext
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.prg import SEED_BYTES, expand_mask
from secure_agg.randomness import RandomSource

__all__ = [
    "add_discrete_gaussian",
    "convolution_statistical_distance",
    "discrete_gaussian",
    "discrete_gaussian_variance",
    "gaussian",
    "table_statistical_distance",
    "uniform32",
    "uniform53",
]

_MAX_SIGMA = 2.0**50  # samples stay below 2^53, exact in float64
# sigma^2 must stay a normal double (a subnormal or zero sigma^2 turns the acceptance
# probability into NaN, and no draw would ever be kept).
_MIN_SIGMA = 2.0**-20
# Each batch keeps about a third of its draws or more: hundreds of batches in a row
# that keep nothing mean the arithmetic broke, not bad luck.
_MAX_BATCHES = 1000
_TWO_TO_MINUS_53 = 2.0**-53
_TWO_TO_MINUS_32 = 2.0**-32
# The inversion table serves sigma up to this (at most 12,293 thresholds, ~0.2 s to
# build once per sigma); larger scales use convolution, then the rejection sampler.
_TABLE_MAX_SIGMA = 512.0
_TABLE_TAIL_SIGMAS = 12
# Convolution (sigma above the table's): each level is z Y + X with X from the table at
# _LEVEL_SIGMA, chosen so the smoothing scale s' = s_Y s_X / sigma is at least
# _MIN_SMOOTHING; up to five levels (sigma up to ~10^13) beat the rejection sampler
# (a million samples on one core here: 8 ms at sigma 1,000, 16 ms at 2.6e7 with three
# levels, 30 ms at 1.6e9 with four; rejection 100-125 ms).
_LEVEL_SIGMA = 512.0
_MIN_SMOOTHING = 4.0
_CONVOLUTION_MAX_LEVELS = 5
_GUIDE_BITS = 16  # the top 16 bits of each 64-bit word index the guide (see _by_table)
_DIGITS = 40  # decimal digits for the table; its own error is ~1e-38


def uniform32(
    rng: RandomSource, size: int, *, out: npt.NDArray[np.float64] | None = None
) -> npt.NDArray[np.float64]:
    """Return ``size`` float64 values uniform on the multiples of 2^-32 in [0, 1).

    Half the keystream of :func:`uniform53` and one pass fewer: for stochastic
    rounding, where a probability off by at most 2^-32 is immaterial. ``out``, a
    float64 vector of ``size`` values, is filled instead of a new one.
    """
    words = expand_mask(rng.random_bytes(SEED_BYTES), size, np.dtype(np.uint32))
    if out is None:
        out = np.empty(size, dtype=np.float64)
    elif out.shape != (size,) or out.dtype != np.float64:
        raise ConfigError(f"out must be a float64 vector of {size} values")
    np.multiply(words, _TWO_TO_MINUS_32, out=out, casting="unsafe")
    return out


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
    _check_arguments(sigma, size)
    return _samples(sigma, size, rng).astype(np.int64, copy=False)


def add_discrete_gaussian(target: npt.NDArray[np.int64], sigma: float, rng: RandomSource) -> None:
    """Add an independent N_Z(0, sigma^2) sample to every value of ``target``, in place.

    The same samples as :func:`discrete_gaussian`, without widening the table's
    16-bit draws (or the convolution's 32-bit sums) to a 64-bit copy first.

    Raises
    ------
    ConfigError
        If ``sigma`` is out of range.
    """
    size = target.shape[0]
    _check_arguments(sigma, size)
    target += _samples(sigma, size, rng)


def _samples(sigma: float, size: int, rng: RandomSource) -> npt.NDArray[np.signedinteger]:
    """Return the samples in the sampler's own (narrowest) integer type."""
    if sigma <= _TABLE_MAX_SIGMA:
        return _by_table(sigma, size, rng)
    if len(_convolution_plan(sigma)[0]) <= _CONVOLUTION_MAX_LEVELS:
        return _by_convolution(sigma, size, rng)
    return _by_rejection(sigma, size, rng)


def _check_arguments(sigma: float, size: int) -> None:
    if not (math.isfinite(sigma) and _MIN_SIGMA <= sigma <= _MAX_SIGMA):
        raise ConfigError(f"sigma must be a finite number in [2^-20, 2^50], got {sigma}")
    if size < 0:
        raise ConfigError(f"size must be >= 0, got {size}")


class _Table:
    """The 64-bit inversion table of N_Z(0, sigma^2) on [-bound, bound] and its guide."""

    def __init__(self, sigma: float) -> None:
        self.bound = _table_bound(sigma)
        with localcontext(prec=_DIGITS):
            two_sigma_squared = 2 * Decimal(sigma) * Decimal(sigma)  # exact: sigma is a double
            weights = [
                (-Decimal(y * y) / two_sigma_squared).exp()
                for y in range(-self.bound, self.bound + 1)
            ]
            scale = Decimal(2**64) / sum(weights, Decimal(0))
            # Threshold j: the probability of the values up to -bound + j, times 2^64, rounded.
            thresholds = []
            cumulative = Decimal(0)
            for weight in weights[:-1]:
                cumulative += weight
                thresholds.append(min(int((cumulative * scale).to_integral_value()), 2**64 - 1))
        self.thresholds = np.array(thresholds, dtype=np.uint64)
        # A word w lands at index #{thresholds <= w}. Every word of bucket b (its top
        # bits) lands at the same index unless a threshold lies inside the bucket.
        shift = 64 - _GUIDE_BITS
        starts = np.arange(1 << _GUIDE_BITS, dtype=np.uint64) << np.uint64(shift)
        ends = starts + np.uint64((1 << shift) - 1)
        first = np.searchsorted(self.thresholds, starts, side="right")
        last = np.searchsorted(self.thresholds, ends, side="right")
        # The guide: each bucket's sample, or the marker `unsure` (below every sample)
        # where a threshold splits the bucket. 16-bit entries (|values| <= 12 * 512 + 1,
        # the marker >= -12,291): a 128 KiB table that stays in cache while it is read.
        self.unsure = -1 - 2 * self.bound
        self.guide = np.where(first == last, first - self.bound, self.unsure).astype(np.int16)
        # Most split buckets hold one threshold (the bulk's values are ~50 buckets wide at
        # sigma 512): there a word's index is first + (word >= that threshold), no search.
        # -1 marks the few buckets (in the tails) that hold more.
        self.single = np.where(last - first == 1, first, -1).astype(np.int32)


def _table_bound(sigma: float) -> int:
    """Return L: the table at ``sigma`` draws values in [-L, L]."""
    return math.ceil(_TABLE_TAIL_SIGMAS * sigma) + 1


@lru_cache(maxsize=16)
def _table(sigma: float) -> _Table:
    return _Table(sigma)


def table_statistical_distance(sigma: float) -> float:
    """Bound the statistical distance of one table sample from N_Z(0, sigma^2) (sigma <= 512).

    Rounding each of the 2L thresholds to a multiple of 2^-64 moves each value's
    probability by at most 2 * 2^-65 (the decimal arithmetic's own error, 1e-38, is
    far below), so the table's pmf is within (2L + 1) 2^-65 in total variation of
    the truncated distribution, which is within P[|Y| > L] of the untruncated one:
    P[|Y| > L] <= 2 e^(-L^2 / 2 sigma^2) / (1 - e^(-L / sigma^2)) / Z with
    Z >= max(1, sigma sqrt(2 pi) - 1) (the sum of a unimodal function is at least its
    integral less its maximum).
    """
    _check_arguments(sigma, 0)
    if sigma > _TABLE_MAX_SIGMA:
        raise ConfigError(f"the table serves sigma <= {_TABLE_MAX_SIGMA}, got {sigma}")
    bound = _table_bound(sigma)
    normaliser = max(1.0, sigma * math.sqrt(2 * math.pi) - 1)
    ratio = bound / (sigma * sigma)
    tail = 2 * math.exp(-(bound * bound) / (2 * sigma * sigma)) / -math.expm1(-ratio)
    return (2 * bound + 1) * 2.0**-65 + tail / normaliser


def _by_table(sigma: float, size: int, rng: RandomSource) -> npt.NDArray[np.int16]:
    """Return ``size`` table samples as int16 (|value| <= 12 * 512 + 1 fits).

    A sample is the index of a uniform 64-bit word among the thresholds. The word's
    top 16 bits and its low 48 are independent and uniform, so they are drawn apart:
    the guide needs only the top (2 bytes a sample from the keystream, read
    contiguously), and the low bits are drawn only for the words whose bucket a
    threshold splits (about 5 % at sigma 512, fewer below): the same samples as drawing
    whole words. A bucket with one threshold needs one comparison, the rest a binary search.
    """
    table = _table(sigma)
    top = expand_mask(rng.random_bytes(SEED_BYTES), size, np.dtype(np.uint16))
    samples: npt.NDArray[np.int16] = np.take(table.guide, top)
    (unsure,) = np.nonzero(samples == table.unsure)
    if unsure.size:
        words = expand_mask(rng.random_bytes(SEED_BYTES), unsure.size, np.dtype(np.uint64))
        words >>= np.uint64(_GUIDE_BITS)
        buckets = top[unsure]
        words |= buckets.astype(np.uint64) << np.uint64(64 - _GUIDE_BITS)
        at = table.single[buckets]
        one = at >= 0
        located = np.empty(unsure.size, dtype=np.int64)
        index = at[one]
        located[one] = index + (table.thresholds[index] <= words[one])
        many = ~one
        located[many] = np.searchsorted(table.thresholds, words[many], side="right")
        samples[unsure] = located - table.bound
    return samples


@dataclass(frozen=True, slots=True)
class _Level:
    """One convolution level: Y_i = z Y_(i+1) + X, X ~ N_Z(0, fine^2) from a table."""

    z: int
    fine: float
    smoothing: float  # s' = sigma_(i+1) fine / sigma_i


@lru_cache(maxsize=16)
def _convolution_plan(sigma: float) -> tuple[tuple[_Level, ...], float]:
    """Return the levels that build N_Z(0, sigma^2) and the base scale (both table-served).

    At each level with target scale S > 512: fine = min(512, S/2),
    z = floor(fine sqrt(1 - fine^2/S^2) / 4) and the next target
    sqrt(S^2 - fine^2) / z, so that z^2 next^2 + fine^2 = S^2 and the smoothing
    scale next * fine / S = fine sqrt(1 - fine^2/S^2) / z is at least 4.
    """
    levels: list[_Level] = []
    target = sigma
    while target > _TABLE_MAX_SIGMA:
        fine = min(_LEVEL_SIGMA, target / 2)
        spread = fine * math.sqrt(1 - (fine / target) ** 2)
        z = math.floor(spread / _MIN_SMOOTHING)
        following = math.sqrt(target * target - fine * fine) / z
        levels.append(_Level(z=z, fine=fine, smoothing=following * fine / target))
        target = following
    return tuple(levels), target


def convolution_statistical_distance(sigma: float) -> float:
    """Bound the statistical distance of one convolution sample from N_Z(0, sigma^2).

    Y = z Y' + X with Y' ~ N_Z(0, a^2), X ~ N_Z(0, b^2), s^2 = z^2 a^2 + b^2:
    completing the square, P[Y = y] is proportional to
    exp(-y^2 / 2 s^2) * rho_s'(Z - c(y)), s' = a b / s, and by Poisson summation
    rho_s'(Z - c) = s' sqrt(2 pi) (1 + e(c)) with |e(c)| <= eta =
    2 e^(-2 pi^2 s'^2) / (1 - e^(-2 pi^2 s'^2)) for every shift c. So P[Y = y] is
    within a factor (1 + eta)/(1 - eta) of N_Z(0, s^2)'s, a statistical distance of
    at most eta / (1 - eta) (about 1e-137 at s' = 4). Each level adds its eta and
    its table draw's distance (:func:`table_statistical_distance`); the base draw
    adds its own.
    """
    _check_arguments(sigma, 0)
    levels, base = _convolution_plan(sigma)
    total = table_statistical_distance(base)
    for level in levels:
        decay = math.exp(-2 * math.pi**2 * level.smoothing**2)
        eta = 2 * decay / (1 - decay)
        total += table_statistical_distance(level.fine) + eta / (1 - eta)
    return total


def _by_convolution(sigma: float, size: int, rng: RandomSource) -> npt.NDArray[np.signedinteger]:
    """Return ``size`` convolution samples, as int32 where every possible value fits.

    Each table draw is at most 12 s + 1 in magnitude, so a level's values are at most
    z times the previous level's bound plus its own draw's: at a 32-bit ring's
    sigma (2.4e7) every value is below 2^29, and the levels run on half the memory.
    """
    levels, base = _convolution_plan(sigma)
    dtype: type[np.int32] | type[np.int64] = (
        np.int32 if _convolution_bound(levels, base) < 2**31 else np.int64
    )
    samples: npt.NDArray[np.signedinteger] = _by_table(base, size, rng).astype(dtype)
    for level in reversed(levels):
        samples *= level.z
        samples += _by_table(level.fine, size, rng)
    return samples


def _convolution_bound(levels: tuple[_Level, ...], base: float) -> int:
    """Return the largest magnitude a convolution sample can take, level by level as built."""
    bound = _table_bound(base)
    for level in reversed(levels):  # the order _by_convolution applies them
        bound = bound * level.z + _table_bound(level.fine)
    return bound


def _by_rejection(sigma: float, size: int, rng: RandomSource) -> npt.NDArray[np.int64]:
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
