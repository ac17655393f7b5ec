"""The randomised Hadamard rotation that spreads an update evenly before quantisation.

Distributed DP quantises each coordinate to a few bits; a vector whose energy
sits in a few coordinates would then be clipped or lose precision. Rotating by
H D (D a random +-1 diagonal, H the normalised Walsh-Hadamard matrix) makes
every coordinate of the rotated vector have about the same magnitude
(Kairouz et al., ICML 2021, Section 4) and preserves the L2 norm, so the
sensitivity is unchanged. All clients of a round use the same D, derived from
a public seed; the server undoes the rotation after unmasking the sum.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.prg import SEED_BYTES, expand_mask

__all__ = ["padded_length", "rotate", "unrotate"]


def padded_length(length: int) -> int:
    """Return the power of two a vector of ``length`` values is padded to (>= 1)."""
    if length < 1:
        raise ConfigError(f"a rotated vector needs at least one value, got {length}")
    return 1 << (length - 1).bit_length()


def _signs(seed: bytes, length: int) -> npt.NDArray[np.float64]:
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"the rotation seed must be {SEED_BYTES} bytes, got {len(seed)}")
    bits = expand_mask(seed, length, np.dtype(np.uint8)) & np.uint8(1)
    return 1.0 - 2.0 * bits.astype(np.float64)


def _walsh_hadamard(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Return H values / sqrt(n) (H Sylvester's Hadamard matrix), in O(n log n) numpy steps."""
    n = values.shape[0]
    out = values.copy()
    half = 1
    while half < n:
        pairs = out.reshape(-1, 2, half)
        left = pairs[:, 0, :].copy()
        pairs[:, 0, :] += pairs[:, 1, :]
        pairs[:, 1, :] = left - pairs[:, 1, :]
        half *= 2
    out /= np.sqrt(n)
    return out


def rotate(values: npt.NDArray[np.floating], seed: bytes) -> npt.NDArray[np.float64]:
    """Return H D values, zero-padded to :func:`padded_length` (norm preserved)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    n = padded_length(flat.shape[0])
    padded = np.zeros(n, dtype=np.float64)
    padded[: flat.shape[0]] = flat
    return _walsh_hadamard(padded * _signs(seed, n))


def unrotate(
    rotated: npt.NDArray[np.floating], seed: bytes, length: int
) -> npt.NDArray[np.float64]:
    """Invert :func:`rotate`: D H rotated (normalised H is its own inverse), first ``length``."""
    flat = np.asarray(rotated, dtype=np.float64).reshape(-1)
    n = flat.shape[0]
    if n != padded_length(length):
        raise ConfigError(
            f"a rotated vector of {length} values has {padded_length(length)} entries, got {n}"
        )
    return (_walsh_hadamard(flat) * _signs(seed, n))[:length]
