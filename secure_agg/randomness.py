"""Sources of randomness: the operating system's CSPRNG in production, a seeded one in tests.

Every function of :mod:`secure_agg` that samples takes a :class:`RandomSource`;
nothing here touches ``random`` or ``numpy.random``.
"""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["DeterministicRandom", "RandomSource", "SystemRandomSource"]


class RandomSource(Protocol):
    """Produce uniformly random bytes."""

    def random_bytes(self, count: int) -> bytes:
        """Return ``count`` uniformly random bytes."""
        ...


class SystemRandomSource:
    """The operating system's CSPRNG (``os.urandom``): the only source for production."""

    def random_bytes(self, count: int) -> bytes:
        """Return ``count`` bytes from ``os.urandom``."""
        return os.urandom(count)


class DeterministicRandom:
    """A reproducible stream (AES-256-CTR keyed by a seed) for tests and simulations.

    Notes
    -----
    Cryptographically strong *given a secret seed*; a seed written in a test is
    public, so never use this for real keys, masks or noise.
    """

    def __init__(self, seed: int | bytes) -> None:
        key = seed if isinstance(seed, bytes) else seed.to_bytes(32, "big", signed=False)
        if len(key) != 32:
            raise ValueError("a DeterministicRandom seed must be an int or 32 bytes")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def random_bytes(self, count: int) -> bytes:
        """Return the next ``count`` bytes of the stream."""
        return self._encryptor.update(bytes(count))
