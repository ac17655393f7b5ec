"""The randomised Hadamard rotation that spreads an update evenly before quantisation.

Distributed DP quantises each coordinate to a few bits; a vector whose energy
sits in a few coordinates would then be clipped or lose precision. Rotating by
H D (D a random +-1 diagonal, H the normalised Walsh-Hadamard matrix) makes
every coordinate of the rotated vector have about the same magnitude
(Kairouz et al., ICML 2021, Section 4) and preserves the L2 norm, so the
sensitivity is unchanged. All clients of a round use the same signs, derived
from a public seed; the server undoes the rotation after unmasking the sum.

Notes
-----
Padding-free: H exists only for powers of two, and padding a vector of d values
to the next one uploads up to twice d (114,410 parameters to 131,072: 18.3 bits
a parameter at a 16-bit ring). Instead, with h = 2^floor(log2 d) (so d < 2h),
the rotation is two overlapping randomised Hadamard transforms with independent
signs: H D_1 on the first h values, then H D_2 on the last h values of the
result (one transform when d is a power of two). Each is orthogonal on its
block and the identity elsewhere, so the whole is orthogonal (norms, and so
sensitivities, are kept) and the output has exactly d values.

Spread (the wrap-around bound of :mod:`strategies.ddp`): a coordinate that only
the first transform touched is sum_j (+-1) x_j / sqrt(h) over the first block,
and one that the second touched is the same over the second block of the first
transform's output; each is sub-Gaussian over its signs with variance proxy at
most ||x||^2 / h (Hoeffding; every block's norm is at most the whole vector's).
So every coordinate of every client is bounded as a full-width rotation of h
values would bound it: h >= d/2 where padding gave d' <= 2d, at most sqrt(2)
more per coordinate in the worst case, for no padding (:func:`spread_length`).
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.prg import SEED_BYTES, expand_mask

__all__ = ["Precision", "rotate", "rotated_length", "spread_length", "unrotate"]

_FLOAT64 = np.dtype(np.float64)
_Floats = TypeVar("_Floats", npt.NDArray[np.float32], npt.NDArray[np.float64])


class Precision(Enum):
    """The float type a rotation runs in."""

    SINGLE = "single"
    DOUBLE = "double"

    @property
    def dtype(self) -> np.dtype[np.floating]:
        """The numpy type."""
        return np.dtype(np.float32 if self is Precision.SINGLE else np.float64)


def rotated_length(length: int) -> int:
    """Return how many values the rotation of ``length`` values has: ``length`` (no padding)."""
    if length < 1:
        raise ConfigError(f"a rotated vector needs at least one value, got {length}")
    return length


def spread_length(length: int) -> int:
    """Return h, the largest power of two <= ``length`` (a rotated value's variance <= |x|^2/h)."""
    return 1 << (rotated_length(length).bit_length() - 1)


def _signs(seed: bytes, length: int) -> npt.NDArray[np.uint8]:
    """Return D for ``length`` values: 1 where the seed's keystream byte is odd (D = -1)."""
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"the rotation seed must be {SEED_BYTES} bytes, got {len(seed)}")
    odd = expand_mask(seed, length, np.dtype(np.uint8))
    odd &= np.uint8(1)
    return odd


_SIGN_BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


def _flip(values: npt.NDArray[np.floating], negative: npt.NDArray[np.uint8]) -> None:
    """Multiply ``values`` in place by D: flip the IEEE sign bit where ``negative`` is 1.

    Exact (the magnitude is untouched) and about 5x faster than a masked negation.
    """
    bits = _SIGN_BITS[values.dtype]
    mask = negative.astype(bits)
    mask <<= bits(values.dtype.itemsize * 8 - 1)
    flat = values.view(bits)
    flat ^= mask


# The transform is applied as a Kronecker product of small Hadamard matrices,
# H_n = H_r (x) H_r (x) ... (Sylvester's construction), one matrix product per
# factor: log_r(n) passes over the vector instead of log_2(n), each a BLAS
# product with exact +-1 entries (4x faster than the radix-2 butterfly on one core).
_RADIX = 16


@lru_cache(maxsize=16)
def _hadamard(size: int, dtype: np.dtype[np.floating] = _FLOAT64) -> npt.NDArray[np.floating]:
    """Return Sylvester's unnormalised Hadamard matrix of ``size`` (a power of two)."""
    matrix = np.ones((1, 1), dtype=dtype)
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    matrix.flags.writeable = False
    return matrix


def _walsh_hadamard(values: _Floats) -> _Floats:
    """Return H values / sqrt(n) (H Sylvester's Hadamard matrix), in O(n log n) work."""
    n = values.shape[0]
    if n == 1:
        return values.copy()
    out = values
    stride = 1
    while stride < n:
        radix = min(_RADIX, n // stride)
        factor = _hadamard(radix, values.dtype)
        if stride == 1:
            # The innermost index: one product of an (n / r) x r matrix with H_r.
            out = out.reshape(-1, radix) @ factor
        else:
            # Index (block, digit, rest): H_r applied to the digit, block by block.
            out = np.matmul(factor, out.reshape(-1, radix, stride))
        stride *= radix
    flat = out.reshape(-1)  # a new array: every step above made one
    flat *= flat.dtype.type(1.0 / np.sqrt(n))
    return flat


def _transform(values: _Floats, negative: npt.NDArray[np.uint8]) -> _Floats:
    """Return H D values (``values`` is changed: its signs flip in place)."""
    _flip(values, negative)
    return _walsh_hadamard(values)


def _inverse(values: _Floats, negative: npt.NDArray[np.uint8]) -> _Floats:
    """Return D H values (H D's inverse: normalised H is its own)."""
    out = _walsh_hadamard(values)
    _flip(out, negative)
    return out


def rotate(
    values: npt.NDArray[np.floating], seed: bytes, *, precision: Precision = Precision.DOUBLE
) -> npt.NDArray[np.floating]:
    """Return the rotation of ``values`` (same length, norm preserved; see the module notes).

    ``precision``: the float type the transform runs in (and returns); single
    precision halves its time and keeps about 7 significant digits.
    """
    out = np.array(values, dtype=precision.dtype).reshape(-1)  # a copy: changed in place
    n = rotated_length(out.shape[0])
    h = spread_length(n)
    if h == n:
        return _transform(out, _signs(seed, n))
    negative = _signs(seed, 2 * h)
    out[:h] = _transform(out[:h], negative[:h])
    out[n - h :] = _transform(out[n - h :], negative[h:])
    return out


def unrotate(
    rotated: npt.NDArray[np.floating], seed: bytes, length: int
) -> npt.NDArray[np.float64]:
    """Invert :func:`rotate` for a vector of ``length`` values (in double precision)."""
    out = np.array(rotated, dtype=np.float64).reshape(-1)
    n = out.shape[0]
    if n != rotated_length(length):
        raise ConfigError(
            f"a rotated vector of {length} values has {rotated_length(length)} entries, got {n}"
        )
    h = spread_length(n)
    if h == n:
        return _inverse(out, _signs(seed, n))
    negative = _signs(seed, 2 * h)
    out[n - h :] = _inverse(out[n - h :], negative[h:])
    out[:h] = _inverse(out[:h], negative[:h])
    return out
