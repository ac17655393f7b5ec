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

from functools import lru_cache

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


def _flip_signs(values: npt.NDArray[np.float64], seed: bytes) -> None:
    """Multiply ``values`` in place by D: -1 where the seed's keystream byte is odd."""
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"the rotation seed must be {SEED_BYTES} bytes, got {len(seed)}")
    odd = expand_mask(seed, values.shape[0], np.dtype(np.uint8)) & np.uint8(1)
    np.negative(values, out=values, where=odd.view(np.bool_))


# The transform is applied as a Kronecker product of small Hadamard matrices,
# H_n = H_r (x) H_r (x) ... (Sylvester's construction), one matrix product per
# factor: log_r(n) passes over the vector instead of log_2(n), each a BLAS
# product with exact +-1 entries (4x faster than the radix-2 butterfly on one core).
_RADIX = 16


@lru_cache(maxsize=8)
def _hadamard(size: int) -> npt.NDArray[np.float64]:
    """Return Sylvester's unnormalised Hadamard matrix of ``size`` (a power of two)."""
    matrix = np.ones((1, 1), dtype=np.float64)
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    matrix.flags.writeable = False
    return matrix


def _walsh_hadamard(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Return H values / sqrt(n) (H Sylvester's Hadamard matrix), in O(n log n) work."""
    n = values.shape[0]
    if n == 1:
        return values.copy()
    out = values
    stride = 1
    while stride < n:
        radix = min(_RADIX, n // stride)
        factor = _hadamard(radix)
        if stride == 1:
            # The innermost index: one product of an (n / r) x r matrix with H_r.
            out = out.reshape(-1, radix) @ factor
        else:
            # Index (block, digit, rest): H_r applied to the digit, block by block.
            out = np.matmul(factor, out.reshape(-1, radix, stride))
        stride *= radix
    flat = out.reshape(-1)  # a new array: every step above made one
    flat *= 1.0 / np.sqrt(n)
    return flat


def rotate(values: npt.NDArray[np.floating], seed: bytes) -> npt.NDArray[np.float64]:
    """Return H D values, zero-padded to :func:`padded_length` (norm preserved)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    n = padded_length(flat.shape[0])
    padded = np.zeros(n, dtype=np.float64)
    padded[: flat.shape[0]] = flat
    _flip_signs(padded, seed)
    return _walsh_hadamard(padded)


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
    out = _walsh_hadamard(flat)
    _flip_signs(out, seed)
    return out[:length]
