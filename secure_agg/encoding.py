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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.prg import SEED_BYTES, uniform_floats
from secure_agg.randomness import RandomSource

__all__ = ["EncodingConfig", "decode_sum", "encode"]

_MIN_QUANT_BITS = 4
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


def encode(
    values: npt.NDArray[np.floating[Any]],
    *,
    weight: int,
    config: EncodingConfig,
    rng: RandomSource,
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Return ``[w * v_1, ..., w * v_d, w]`` in the ring's dtype.

    Raises
    ------
    ConfigError
        If the weight is outside [1, weight_cap] or a value is not finite.
    """
    if not 1 <= weight <= config.weight_cap:
        raise ConfigError(f"weight must be in [1, {config.weight_cap}], got {weight}")
    flat = np.asarray(values).reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    if not np.isfinite(flat).all():
        raise ConfigError("cannot encode NaN or infinite values")
    # In place on one float64 buffer: every pass over a million values counts.
    levels = np.empty(flat.shape[0], dtype=np.float64)
    np.clip(flat, -config.clip_range, config.clip_range, out=levels)
    levels += config.clip_range
    levels *= config.scale
    # + U[0, 1): unbiased stochastic rounding.
    levels += uniform_floats(rng.random_bytes(SEED_BYTES), flat.shape[0])
    np.floor(levels, out=levels)
    top = float((1 << config.quant_bits) - 1)
    np.minimum(levels, top, out=levels)  # guards the float edge case x == c, u -> 1
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
