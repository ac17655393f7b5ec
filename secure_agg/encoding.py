"""Turn float updates into ring integers and back: clip, scale, stochastic rounding, weighting.

Each client clips every value to [-c, c], maps it to [0, 2^q - 1] with scale
s = (2^q - 1) / (2c), rounds stochastically (unbiased: E[v] = (x + c) s) with
uniforms from a cryptographic PRG, multiplies the integers by its integer
weight w (its example count, capped) and appends w. The server's exact modular
sum is then (sum_i w_i v_i, sum_i w_i), from which the weighted mean follows
with no precision lost to the weighting (Flower multiplies floats by the weight
before quantising).

Notes
-----
No wrap-around: with at most ``max_clients`` clients of weight at most
``weight_cap``, every coordinate of the sum is below max_clients * weight_cap
* 2^q <= 2^b because q = b - ceil(log2(max_clients * weight_cap + 1)).
Per client and coordinate the rounding error of an in-range value is below 1/s.

Conditional rounding (central DP under secure aggregation): stochastic rounding
can push a clipped update's norm past its clip C (each coordinate moves by up
to 1/s, so by up to sqrt(d)/s in L2). With ``l2_bound`` the encoder re-draws
the rounding until the decoded values' L2 norm is at most that bound (Kairouz,
Liu and Steinke, ICML 2021, section 4.1, in real units:
:func:`conditional_rounding_bound`), so the bound is the sensitivity a DP
mechanism on the sum can account for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.noise import uniform32
from secure_agg.randomness import RandomSource

__all__ = ["EncodingConfig", "conditional_rounding_bound", "decode_sum", "encode"]

_MIN_QUANT_BITS = 4
# Conditional rounding's beta = e^(-1/2) (Kairouz et al.): each try is kept with
# probability >= 1 - beta ~ 0.39, so 200 tries all failing has probability < 1e-43.
_LOG_INV_BETA = 0.5
_MAX_ROUNDING_TRIES = 200
# Levels below 2^16: stochastic rounding cannot reach top + 1 (see _levels).
_EXACT_QUANT_BITS = 16
_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodingConfig:
    """How updates are quantised into the ring Z_{2^ring_bits}.

    Parameters
    ----------
    clip_range
        c: values are clipped to [-c, c]; > 0 and finite.
    ring_bits
        b, the modulus exponent, 8..64; payloads use the narrowest unsigned type that fits.
    max_clients
        The most clients whose inputs may be summed, >= 1.
    weight_cap
        The largest integer weight a client may apply, >= 1 (1: unweighted mean).
    """

    clip_range: float
    ring_bits: int = 32
    max_clients: int
    weight_cap: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(f"clip_range must be a finite number > 0, got {self.clip_range}")
        if not 8 <= self.ring_bits <= 64:
            raise ConfigError(f"ring_bits must be in 8..64, got {self.ring_bits}")
        if self.max_clients < 1 or self.weight_cap < 1:
            raise ConfigError("max_clients and weight_cap must be >= 1")
        if self.quant_bits < _MIN_QUANT_BITS:
            raise ConfigError(
                f"a {self.ring_bits}-bit ring leaves {self.quant_bits} bits per value for "
                f"{self.max_clients} clients of weight <= {self.weight_cap}; "
                f"need >= {_MIN_QUANT_BITS}: widen the ring or lower the weight cap"
            )

    @property
    def quant_bits(self) -> int:
        """q, the bits of each client's quantised value."""
        return self.ring_bits - math.ceil(math.log2(self.max_clients * self.weight_cap + 1))

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        """The payload's integer type: the narrowest of 8, 16, 32 and 64 bits holding the ring."""
        for candidate in _DTYPES:
            if np.iinfo(candidate).bits >= self.ring_bits:
                return np.dtype(candidate)
        raise AssertionError("unreachable: ring_bits <= 64")

    @property
    def ring_mask(self) -> int:
        """2^b - 1: reduces an integer modulo the ring."""
        return (1 << self.ring_bits) - 1

    @property
    def scale(self) -> float:
        """S = (2^q - 1) / (2c): quantisation steps per unit."""
        return ((1 << self.quant_bits) - 1) / (2 * self.clip_range)

    @property
    def error_bound(self) -> float:
        """The largest rounding error of one in-range value of one client (1/s)."""
        return 1.0 / self.scale


def conditional_rounding_bound(l2_clip: float, dimension: int, config: EncodingConfig) -> float:
    """Return the L2 bound conditional rounding keeps a decoded, C-clipped update within.

    B^2 = C^2 + d / (4 s^2) + sqrt(2 ln(1/beta)) (C / s + sqrt(d) / (2 s^2)), beta = e^(-1/2),
    capped by C + sqrt(d) / s (every coordinate moves by less than 1/s).
    """
    if not (math.isfinite(l2_clip) and l2_clip > 0) or dimension < 1:
        raise ConfigError("l2_clip must be > 0 and dimension >= 1")
    step = config.error_bound  # 1 / s
    conditional = math.sqrt(
        l2_clip * l2_clip
        + dimension * step * step / 4
        + math.sqrt(2 * _LOG_INV_BETA) * (l2_clip * step + math.sqrt(dimension) * step * step / 2)
    )
    return min(conditional, l2_clip + math.sqrt(dimension) * step)


def _levels(
    flat: npt.NDArray[np.floating[Any]],
    config: EncodingConfig,
    rng: RandomSource,
    l2_bound: float | None,
    bounded: int,
    *,
    consume: bool,
) -> npt.NDArray[np.float64]:
    # In place on one float64 buffer: every pass over a million values counts.
    scaled: npt.NDArray[np.float64]
    if consume and flat.dtype == np.float64 and flat.flags.c_contiguous and flat.flags.writeable:
        scaled = cast("npt.NDArray[np.float64]", flat)
    else:
        scaled = np.empty(flat.shape[0], dtype=np.float64)
    np.clip(flat, -config.clip_range, config.clip_range, out=scaled)
    scaled += config.clip_range
    scaled *= config.scale
    top = float((1 << config.quant_bits) - 1)
    # With top < 2^16, x = (v + c) s exceeds top by at most top 2^-52 < 2^-36 and
    # u <= 1 - 2^-32, so x + u stays below top + 1 by far more than its rounding (ulp
    # 2^-37 there) and floor(x + u) <= top. Wider, the sum can round up to top + 1.
    guard = config.quant_bits > _EXACT_QUANT_BITS
    uniforms = np.empty(flat.shape[0], dtype=np.float64)

    def round_into(levels: npt.NDArray[np.float64]) -> None:
        # + U[0, 1) then floor: unbiased stochastic rounding.
        levels += uniform32(rng, flat.shape[0], out=uniforms)
        np.floor(levels, out=levels)
        if guard:
            np.minimum(levels, top, out=levels)  # the float edge case x == c, u -> 1

    if l2_bound is None:
        round_into(scaled)
        return scaled
    for _ in range(_MAX_ROUNDING_TRIES):
        levels = scaled.copy()
        round_into(levels)
        decoded = levels[:bounded] / config.scale - config.clip_range
        if float(np.linalg.norm(decoded)) <= l2_bound:
            return levels
    raise ConfigError("conditional rounding failed: the update is not clipped to its bound")


def encode(
    values: npt.NDArray[np.floating[Any]],
    *,
    weight: int,
    config: EncodingConfig,
    rng: RandomSource,
    l2_bound: float | None = None,
    bounded_length: int | None = None,
    consume: bool = False,
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Return ``[w * v_1, ..., w * v_d, w]`` in the ring's dtype.

    Parameters
    ----------
    l2_bound, bounded_length
        Conditional rounding: re-draw the rounding until the first
        ``bounded_length`` decoded values (all by default) have L2 norm at most
        ``l2_bound`` (see :func:`conditional_rounding_bound`).
    consume
        ``values`` (a float64 vector the caller no longer needs) may be
        overwritten: the levels are computed in its memory, saving a buffer.

    Raises
    ------
    ConfigError
        If the weight is outside [1, weight_cap], a value is not finite, or
        conditional rounding cannot meet the bound (the values exceed it).
    """
    if not 1 <= weight <= config.weight_cap:
        raise ConfigError(f"weight must be in [1, {config.weight_cap}], got {weight}")
    flat = np.asarray(values).reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    if not np.isfinite(flat).all():
        raise ConfigError("cannot encode NaN or infinite values")
    bounded = flat.shape[0] if bounded_length is None else bounded_length
    if not 0 <= bounded <= flat.shape[0]:
        raise ConfigError(f"bounded_length must be in [0, {flat.shape[0]}], got {bounded}")
    levels = _levels(flat, config, rng, l2_bound, bounded, consume=consume)
    top = float((1 << config.quant_bits) - 1)
    out = np.empty(flat.shape[0] + 1, dtype=config.dtype)
    if weight * top < 2.0**53:
        # Exact in float64: integers below 2^53 are represented exactly.
        if weight != 1:
            levels *= weight
        out[:-1] = levels
    else:
        out[:-1] = levels.astype(np.uint64) * np.uint64(weight)
    out[-1] = weight
    return out


def decode_sum(
    total: npt.NDArray[np.unsignedinteger[Any]], *, config: EncodingConfig
) -> tuple[npt.NDArray[np.float64], int]:
    """Return the weighted mean of the encoded inputs and their total weight.

    Raises
    ------
    ConfigError
        If the total weight is zero (no inputs) or exceeds what the config allows.
    """
    reduced = np.asarray(total, dtype=np.uint64) & np.uint64(config.ring_mask)
    total_weight = int(reduced[-1])
    if not 1 <= total_weight <= config.max_clients * config.weight_cap:
        raise ConfigError(f"total weight {total_weight} is impossible for this encoding")
    # float64 is exact up to 2^53; beyond that the relative error is 2^-53, far
    # below the quantisation error.
    mean = reduced[:-1].astype(np.float64) / (total_weight * config.scale) - config.clip_range
    return mean, total_weight
