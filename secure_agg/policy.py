"""The part of a device's policy that the SecAgg+ protocol enforces: what a client accepts.

A :class:`ProtocolPolicy` is fixed on the device (installed at enrolment) and
never taken from a server message. :class:`secure_agg.client.ClientSession`
checks every round setup against it before it generates a key, and checks the
survivor set against it before it reveals a share: a request outside the policy
raises :class:`PolicyViolation` with nothing revealed.

Notes
-----
What the policy pins, and why each matters against an active server:

- ``threat_model`` and ``authority_public_key``: a server that could announce
  "semi-honest", or name its own enrolment authority, could invent neighbours
  and collect both shares of a victim's secrets.
- ``min_degree`` and the threshold rule (:func:`secure_agg.params.required_threshold`
  with the policy's ``corrupt_fraction`` and ``security_log2``): a server that
  could set t = 1 would reconstruct a victim's secrets from one share.
- ``min_survivors``: a server that declares everyone else dropped would learn a
  single client's update as "the sum".
- ``ring_bits``, ``max_participants``, ``max_vector_length``: bounds on the work
  and memory a round may demand of the device.
- ``require_certificate_expiry``: a neighbour certificate that never expires
  (version 1) is refused, so a stolen identity key stops working by itself.

A neighbour's certificate is checked (:meth:`ProtocolPolicy.check_certificate`)
against the pinned authority, the device's *own* clock and the revocation list
the device itself verified: a server cannot supply the time or the list.
"""

from __future__ import annotations

import math
from collections.abc import Set
from dataclasses import dataclass, field

from fedge.errors import ConfigError
from secure_agg.crypto import KEY_BYTES
from secure_agg.errors import CryptoError, PolicyViolation
from secure_agg.identity import IdentityCertificate
from secure_agg.messages import RoundSetup
from secure_agg.params import ThreatModel, corrupt_count, required_threshold

__all__ = ["ProtocolPolicy"]

_RING_WIDTHS = frozenset({8, 16, 32, 64})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolPolicy:
    """What a device accepts in a secure round (see the module notes).

    Parameters
    ----------
    threat_model
        The model the device runs; a round set up for another is refused.
    authority_public_key
        The enrolment authority's Ed25519 key (32 bytes; required in the active model).
    ring_bits
        The ring widths the device accepts.
    min_degree
        The fewest holders k the device shares its secrets with.
    corrupt_fraction
        The fraction of a round's participants the device assumes may collude
        with the server, in [0, 1); counted as ceil(fraction * n).
    security_log2
        sigma: the device accepts a threshold only if its holders include more
        corrupt clients than the threshold tolerates with probability <= 2^-sigma.
    min_survivors
        The fewest clients in the sum before the device reveals anything.
    max_participants, max_vector_length
        The largest round and update the device accepts.
    require_certificate_expiry
        Refuse neighbours whose certificate never expires (version 1).
    accept_prekeys
        Take part in rounds keyed in advance (:mod:`secure_agg.prekeys`): announce
        the keys of the next participation with the last reply of a round.
    prekey_max_age_s
        The longest a pending pre-key may wait on the device (its own clock); an
        older one is discarded unused, bounding what taking the device's state
        between rounds reveals.
    accept_server_graph
        Semi-honest model only: let the server draw who holds whose shares, so a
        round keyed in advance masks in its first trip (two full-fleet trips a
        round instead of three). The device then relies on the server drawing the
        graph at random, which only a server that follows the protocol does; the
        active model never accepts it (see ``docs/threat-model.md``).
    """

    threat_model: ThreatModel
    authority_public_key: bytes | None = None
    ring_bits: frozenset[int] = field(default=_RING_WIDTHS)
    min_degree: int = 2
    corrupt_fraction: float = 0.1
    security_log2: float = 40.0
    min_survivors: int = 2
    max_participants: int = 100_000
    max_vector_length: int = 1 << 28
    require_certificate_expiry: bool = False
    accept_prekeys: bool = True
    prekey_max_age_s: int = 7 * 24 * 3600
    accept_server_graph: bool = False

    def __post_init__(self) -> None:
        if self.threat_model is ThreatModel.ACTIVE and self.authority_public_key is None:
            raise ConfigError("the active threat model needs the enrolment authority's key")
        if self.authority_public_key is not None and len(self.authority_public_key) != KEY_BYTES:
            raise ConfigError(f"the authority key must be {KEY_BYTES} bytes")
        if not self.ring_bits or not self.ring_bits <= frozenset(range(8, 65)):
            raise ConfigError("ring_bits must name widths in 8..64")
        if self.min_degree < 1:
            raise ConfigError(f"min_degree must be >= 1, got {self.min_degree}")
        if not 0 <= self.corrupt_fraction < 1:
            raise ConfigError(f"corrupt_fraction must be in [0, 1), got {self.corrupt_fraction}")
        if not (math.isfinite(self.security_log2) and 1 <= self.security_log2 <= 256):
            raise ConfigError(f"security_log2 must be in [1, 256], got {self.security_log2}")
        if self.min_survivors < 2:
            raise ConfigError(f"min_survivors must be >= 2, got {self.min_survivors}")
        if self.max_participants < self.min_survivors:
            raise ConfigError("max_participants must be >= min_survivors")
        if self.max_vector_length < 2:
            raise ConfigError("max_vector_length must be >= 2")
        if self.prekey_max_age_s < 1:
            raise ConfigError(f"prekey_max_age_s must be >= 1, got {self.prekey_max_age_s}")
        if self.require_certificate_expiry and self.authority_public_key is None:
            raise ConfigError("require_certificate_expiry needs the enrolment authority's key")
        self._check_server_graph()

    def _check_server_graph(self) -> None:
        if not self.accept_server_graph:
            return
        if self.threat_model is ThreatModel.ACTIVE:
            raise ConfigError(
                "accept_server_graph is for the semi-honest model: an active server could "
                "surround a device with colluding holders"
            )
        if not self.accept_prekeys:
            raise ConfigError("accept_server_graph needs accept_prekeys")

    def least_threshold(self, num_clients: int, degree: int) -> int:
        """Return the least t the device accepts with ``degree`` holders among ``num_clients``."""
        return required_threshold(
            num_clients,
            degree,
            corrupt_fraction=self.corrupt_fraction,
            threat_model=self.threat_model,
            security_log2=self.security_log2,
        )

    def corrupt_bound(self, num_clients: int) -> int:
        """Return how many of ``num_clients`` participants the device assumes corrupt."""
        return corrupt_count(num_clients, self.corrupt_fraction)

    def check_setup(self, setup: RoundSetup) -> None:
        """Refuse a round setup outside the policy.

        Raises
        ------
        PolicyViolation
            Naming the first parameter outside the policy.
        """
        if setup.threat_model is not self.threat_model:
            raise PolicyViolation(
                f"the round runs the {setup.threat_model.value} model; "
                f"the device's policy requires {self.threat_model.value}"
            )
        n = len(setup.participants)
        if setup.node_id not in setup.participants:
            raise PolicyViolation("the participant list does not include this device")
        if not self.min_survivors <= n <= self.max_participants:
            raise PolicyViolation(
                f"{n} participants outside the policy's [{self.min_survivors}, "
                f"{self.max_participants}]"
            )
        if setup.encoding.ring_bits not in self.ring_bits:
            raise PolicyViolation(
                f"a {setup.encoding.ring_bits}-bit ring is outside the policy's "
                f"{sorted(self.ring_bits)}"
            )
        if setup.vector_length > self.max_vector_length:
            raise PolicyViolation(
                f"a vector of {setup.vector_length} values exceeds the policy's "
                f"{self.max_vector_length}"
            )
        least_degree = min(self.min_degree, n - 1)
        if not least_degree <= setup.degree <= n - 1:
            raise PolicyViolation(
                f"{setup.degree} holders outside [{least_degree}, {n - 1}] for {n} participants"
            )
        least = self.least_threshold(n, setup.degree)
        if not least <= setup.threshold <= setup.degree:
            raise PolicyViolation(
                f"threshold {setup.threshold} with {setup.degree} holders among {n} "
                f"participants: the policy needs [{least}, {setup.degree}] "
                f"({self.threat_model.value}, {self.corrupt_fraction:.0%} corrupt, "
                f"2^-{self.security_log2:g})"
            )

    def check_survivors(self, survivors: int, *, required: int = 0) -> None:
        """Refuse to reveal anything for a sum of fewer than the policy's survivors.

        Raises
        ------
        PolicyViolation
            If ``survivors`` is below ``min_survivors`` or ``required``.
        """
        least = max(self.min_survivors, required)
        if survivors < least:
            raise PolicyViolation(
                f"{survivors} survivors; the device unmasks only for at least {least}"
            )

    def check_certificate(
        self,
        certificate: IdentityCertificate | None,
        *,
        now: int | None,
        revoked: Set[str] = frozenset(),
    ) -> None:
        """Refuse a neighbour's certificate the device cannot accept.

        Parameters
        ----------
        certificate
            The certificate a neighbour's advertisement carries (``None``: none).
        now
            The device's own clock in Unix seconds (never a server's); ``None``
            when it has none, and then a certificate that expires is refused.
        revoked
            The enrolment ids of the device's latest verified revocation list.

        Raises
        ------
        CryptoError
            Opaquely, if the certificate is missing, not signed by the pinned
            authority, expired (or expiring with no clock), revoked, or never
            expires while the policy requires an expiry.
        ConfigError
            If the policy pins no authority or ``now`` is not an integer.

        Notes
        -----
        Revoked, expired and forged certificates fail with the same error, so a
        neighbour (or the server relaying it) learns nothing about which check
        failed, and the device treats them all alike: refused before anything
        is revealed.
        """
        authority = self.authority_public_key
        if authority is None:
            raise ConfigError("checking a certificate needs the enrolment authority's key")
        if certificate is None:
            raise CryptoError
        certificate.verify_at_time(authority, now)
        if self.require_certificate_expiry and certificate.expires_at is None:
            raise CryptoError
        if certificate.enrolment_id in revoked:
            raise CryptoError
