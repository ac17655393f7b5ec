"""Shamir secret sharing over GF(2^31 - 1), vectorised across all of a client's secrets.

A 32-byte secret is cut into eleven 3-byte chunks; each chunk is one field
element and gets its own random polynomial of degree ``threshold - 1``. All the
chunks of all the secrets a client shares are evaluated at once with numpy
(Horner's rule over a (holders x chunks) matrix), so sharing two secrets with a
hundred neighbours is a few vector operations, not a Python loop per byte.

Notes
-----
Security: any ``threshold - 1`` shares of a chunk are uniformly distributed and
independent of it (information-theoretic), so they reveal nothing about the
secret. Polynomial coefficients are drawn from the caller's random source
exactly uniformly: 31 random bits each, the one value >= p redrawn (rejection
sampling; a 64-bit value reduced modulo p would carry a 2^-33 bias).
Reference: A. Shamir, "How to share a secret", CACM 1979.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from secure_agg.randomness import RandomSource

__all__ = [
    "CHUNKS_PER_SECRET",
    "PRIME",
    "SECRET_BYTES",
    "combine",
    "lagrange_at_zero",
    "split",
    "uniform_field_elements",
]

PRIME = (1 << 31) - 1
SECRET_BYTES = 32
_CHUNK_BYTES = 3
CHUNKS_PER_SECRET = -(-SECRET_BYTES // _CHUNK_BYTES)  # 11
_PADDED = CHUNKS_PER_SECRET * _CHUNK_BYTES  # 33
_CHUNK_LIMIT = 1 << (8 * _CHUNK_BYTES)

ShareMatrix = npt.NDArray[np.uint32]


def _secrets_to_chunks(secrets: Sequence[bytes]) -> npt.NDArray[np.uint64]:
    for secret in secrets:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"secrets must be {SECRET_BYTES} bytes, got {len(secret)}")
    raw = np.frombuffer(b"".join(b"\x00" + s for s in secrets), dtype=np.uint8)
    triples = raw.reshape(len(secrets) * CHUNKS_PER_SECRET, _CHUNK_BYTES).astype(np.uint64)
    values = (triples[:, 0] << np.uint64(16)) | (triples[:, 1] << np.uint64(8)) | triples[:, 2]
    return values


def _chunks_to_secrets(values: npt.NDArray[np.uint64], count: int) -> list[bytes] | None:
    if np.any(values >= _CHUNK_LIMIT):
        return None
    triples = np.empty((values.shape[0], _CHUNK_BYTES), dtype=np.uint8)
    triples[:, 0] = (values >> np.uint64(16)) & np.uint64(0xFF)
    triples[:, 1] = (values >> np.uint64(8)) & np.uint64(0xFF)
    triples[:, 2] = values & np.uint64(0xFF)
    flat = triples.tobytes()
    secrets = [flat[i * _PADDED : (i + 1) * _PADDED] for i in range(count)]
    if any(s[0] != 0 for s in secrets):
        return None
    return [s[1:] for s in secrets]


def split(
    secrets: Sequence[bytes], *, threshold: int, num_shares: int, rng: RandomSource
) -> ShareMatrix:
    """Share every secret among ``num_shares`` holders, any ``threshold`` of whom recover it.

    Parameters
    ----------
    secrets
        32-byte secrets (a client's self-mask seed and masking key, say).
    threshold
        Shares needed to reconstruct, 1 <= threshold <= num_shares.
    num_shares
        Holders; holder ``h`` (0-based) gets the evaluation at x = h + 1.
    rng
        Source of the polynomial coefficients.

    Returns
    -------
    numpy.ndarray
        uint32 array of shape (num_shares, len(secrets) * 11): row ``h`` is
        holder ``h``'s share of every secret, secret after secret.
    """
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= num_shares ({num_shares})")
    if num_shares >= PRIME:
        raise ValueError("too many shares for the field")
    constant = _secrets_to_chunks(secrets)
    width = constant.shape[0]
    coefficients = uniform_field_elements(rng, (threshold - 1) * width).reshape(
        threshold - 1, width
    )
    xs = np.arange(1, num_shares + 1, dtype=np.uint64).reshape(-1, 1)
    prime = np.uint64(PRIME)
    # Horner: p(x) = c0 + x (c1 + x (c2 + ...)); every product stays below 2^62.
    accumulator = np.zeros((num_shares, width), dtype=np.uint64)
    for row in coefficients[::-1]:
        accumulator = (accumulator + row) % prime
        accumulator = (accumulator * xs) % prime
    accumulator = (accumulator + constant) % prime
    return accumulator.astype(np.uint32)


def uniform_field_elements(rng: RandomSource, count: int) -> npt.NDArray[np.uint64]:
    """Return ``count`` elements drawn uniformly from GF(2^31 - 1) by rejection sampling."""
    values = np.frombuffer(rng.random_bytes(4 * count), dtype=">u4").astype(np.uint64)
    values &= np.uint64(0x7FFFFFFF)
    while True:
        bad = np.flatnonzero(values >= PRIME)
        if bad.size == 0:
            return values
        fresh = np.frombuffer(rng.random_bytes(4 * bad.size), dtype=">u4").astype(np.uint64)
        values[bad] = fresh & np.uint64(0x7FFFFFFF)


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Return the Lagrange coefficients that interpolate a polynomial at 0 from points ``xs``."""
    if len(set(xs)) != len(xs):
        raise ValueError("share x-coordinates must be distinct")
    coefficients = []
    for j, xj in enumerate(xs):
        numerator = 1
        denominator = 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = numerator * xm % PRIME
                denominator = denominator * (xm - xj) % PRIME
        coefficients.append(numerator * pow(denominator, PRIME - 2, PRIME) % PRIME)
    return coefficients


def combine(xs: Sequence[int], shares: ShareMatrix, *, num_secrets: int) -> list[bytes] | None:
    """Reconstruct the secrets from shares at distinct points ``xs`` (1-based holder numbers).

    Returns ``None`` when the result cannot be a valid encoding of 32-byte
    secrets, which catches most corrupted shares; callers verify the secrets
    against a commitment to catch the rest.
    """
    matrix = np.asarray(shares, dtype=np.uint64)
    if matrix.shape != (len(xs), num_secrets * CHUNKS_PER_SECRET):
        raise ValueError(
            f"shares must have shape ({len(xs)}, {num_secrets * CHUNKS_PER_SECRET}), "
            f"got {matrix.shape}"
        )
    if np.any(matrix >= PRIME):
        return None
    prime = np.uint64(PRIME)
    total = np.zeros(matrix.shape[1], dtype=np.uint64)
    for coefficient, row in zip(lagrange_at_zero(xs), matrix, strict=True):
        total = (total + (row * np.uint64(coefficient)) % prime) % prime
    return _chunks_to_secrets(total, num_secrets)
