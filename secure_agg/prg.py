"""Expand seeds into masks with a cryptographic PRG (AES-256-CTR), straight into ring integers.

Notes
-----
Masks must be indistinguishable from uniform on the ring Z_{2^b}: AES-256 in
counter mode, keyed by a 256-bit seed, is a PRF-based PRG whose output is
computationally indistinguishable from random bytes. The bytes are viewed as
unsigned integers of the payload's width and reduced modulo 2^b by masking the
high bits, which keeps them exactly uniform because 2^b divides 2^width.
Flower's SecAgg+ instead seeds numpy's Mersenne Twister with a 32-bit fold of
the shared secret: 2^32 possible masks, and a generator that is not
cryptographic.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["SEED_BYTES", "add_mask", "apply_masks", "expand_mask", "uniform_floats"]

_UIntArray = npt.NDArray[np.unsignedinteger[Any]]

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)
# Masks are applied block by block so the keystream buffer and the slice of the
# target stay in the CPU cache while every mask of the round is added to it.
_BLOCK_BYTES = 1 << 18


@lru_cache(maxsize=4)
def _zeros(nbytes: int) -> bytes:
    # CTR mode XORs the keystream into its input: encrypting zeros yields the
    # keystream. One cached zero buffer per size saves an allocation (and the
    # page faults of touching it) for every mask of a round.
    return bytes(nbytes)


def _check_seed(seed: bytes) -> None:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed must be {SEED_BYTES} bytes, got {len(seed)}")


def expand_mask(seed: bytes, length: int, dtype: np.dtype[np.unsignedinteger[Any]]) -> _UIntArray:
    """Return ``length`` pseudo-random unsigned integers of ``dtype`` derived from ``seed``.

    Each seed must be used for one mask only (the nonce is fixed at zero: the
    seed *is* the per-mask key).
    """
    _check_seed(seed)
    out = np.empty(length, dtype=dtype)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    view = out.data.cast("B")
    encryptor.update_into(_zeros(view.nbytes), view)
    return out


def add_mask(
    target: _UIntArray,
    seed: bytes,
    *,
    subtract: bool = False,
    scratch: _UIntArray | None = None,
) -> None:
    """Add (or subtract) the mask of ``seed`` to ``target`` in place, wrapping modulo its width.

    ``scratch``, a buffer of ``target``'s shape and dtype, avoids an allocation
    per mask when many masks are applied in a row.
    """
    _check_seed(seed)
    buffer = scratch if scratch is not None else np.empty_like(target)
    view = buffer.data.cast("B")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    encryptor.update_into(_zeros(view.nbytes), view)
    if subtract:
        np.subtract(target, buffer, out=target)
    else:
        np.add(target, buffer, out=target)


def apply_masks(target: _UIntArray, masks: Sequence[tuple[bytes, bool]]) -> None:
    """Add (or, where the flag is True, subtract) the mask of every seed to ``target`` in place.

    Equivalent to one :func:`add_mask` per seed, but fused: one pass over
    ``target`` in cache-sized blocks, each seed's AES-CTR stream continuing
    from block to block, so no full-size keystream buffer is ever written.
    """
    for seed, _ in masks:
        _check_seed(seed)
    if not masks or target.size == 0:
        return
    streams = [
        (Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor(), subtract)
        for seed, subtract in masks
    ]
    step = max(1, _BLOCK_BYTES // target.dtype.itemsize)
    scratch = np.empty(min(step, target.size), dtype=target.dtype)
    zeros = memoryview(_zeros(scratch.nbytes))
    flat = target.reshape(-1)
    for start in range(0, flat.size, step):
        chunk = flat[start : start + step]
        buffer = scratch[: chunk.size]
        view = buffer.data.cast("B")
        source = zeros[: view.nbytes]
        for encryptor, subtract in streams:
            encryptor.update_into(source, view)
            if subtract:
                np.subtract(chunk, buffer, out=chunk)
            else:
                np.add(chunk, buffer, out=chunk)


def uniform_floats(seed: bytes, length: int) -> npt.NDArray[np.float64]:
    """Return ``length`` floats uniform in [0, 1) (32 bits of resolution) derived from ``seed``."""
    words = expand_mask(seed, length, np.dtype(np.uint32))
    return words.astype(np.float64) * (1.0 / 4294967296.0)
