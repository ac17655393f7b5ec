"""Choose the SecAgg+ holder count k and threshold t, and the least t a device accepts.

Every client secret-shares its self-mask seed and masking key among k
*holders* it draws itself, uniformly from the round's other participants
(:mod:`secure_agg.graph`), so the number of corrupt holders of a fixed client
is hypergeometric whatever the server does. Bell et al. (CCS 2020) pick
k = O(log n) and t so that (a) every surviving client keeps at least t
surviving holders (the round completes: correctness failure at most 2^-eta)
and (b) no client's holders include enough corrupt clients to reveal its input
(security failure at most 2^-sigma); a union bound over the n clients gives
the round-level probabilities computed here exactly with integers.

Notes
-----
Security condition per threat model, for a client whose k holders include at
most c_max corrupt ones (:func:`corrupt_holders_bound`):

- semi-honest server: t > c_max (corrupt holders alone cannot reconstruct);
- active server: k + c_max < 2t, i.e. t >= floor((k + c_max) / 2) + 1. Honest
  holders reveal either the self-mask share or the masking-key share of a
  client, never both; a server that lies about who dropped needs t of each, so
  it needs (k - c_max) + 2 c_max >= 2t shares.

The corrupt count is ceil(corrupt_fraction * n): rounding down would assume no
corrupt client at all in rounds of fewer than 1 / corrupt_fraction clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import cache

from fedge.errors import ConfigError

__all__ = [
    "NeighbourhoodParams",
    "ThreatModel",
    "choose_neighbourhood",
    "corrupt_count",
    "corrupt_holders_bound",
    "failure_log2",
    "required_threshold",
]


class ThreatModel(Enum):
    """What the server may do."""

    SEMI_HONEST = "semi-honest"
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class NeighbourhoodParams:
    """Holders per client and reconstruction threshold, with their failure bounds (log2)."""

    num_clients: int
    degree: int
    threshold: int
    security_log2: float
    correctness_log2: float

    @property
    def is_complete(self) -> bool:
        """True when every client shares with every other (classic SecAgg)."""
        return self.degree >= self.num_clients - 1


@cache
def _tail_at_least(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X hypergeometric(population, marked, draws)."""
    if at_least <= 0:
        return 1.0
    total = math.comb(population, draws)
    upper = min(marked, draws)
    favourable = sum(
        math.comb(marked, x) * math.comb(population - marked, draws - x)
        for x in range(at_least, upper + 1)
    )
    return favourable / total


def _log2(probability: float) -> float:
    return -math.inf if probability <= 0 else math.log2(probability)


def corrupt_count(num_clients: int, corrupt_fraction: float) -> int:
    """Return how many of ``num_clients`` may be corrupt: ceil(fraction * n), exact for decimals."""
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, not 4 clients.
    return math.ceil(round(corrupt_fraction * num_clients, 9))


@cache
def corrupt_holders_bound(
    num_clients: int, degree: int, corrupt_fraction: float, security_log2: float
) -> int:
    """Return c_max: the most corrupt holders a client has, except with probability 2^-sigma.

    The client's ``degree`` holders are a uniform sample of the other
    ``num_clients - 1`` participants, of which ``corrupt_count(n, fraction)``
    are corrupt (the client itself is honest).
    """
    others = num_clients - 1
    draws = min(degree, others)
    corrupt = min(corrupt_count(num_clients, corrupt_fraction), others)
    limit = 2.0**-security_log2
    for bound in range(draws + 1):
        if _tail_at_least(others, corrupt, draws, bound + 1) <= limit:
            return bound
    return draws


def required_threshold(
    num_clients: int,
    degree: int,
    *,
    corrupt_fraction: float,
    threat_model: ThreatModel,
    security_log2: float,
) -> int:
    """Return the least t that keeps a client's secrets safe (may exceed ``degree``: no safe t).

    semi-honest: c_max + 1; active: floor((k + c_max) / 2) + 1 (see the module notes).
    """
    draws = min(degree, num_clients - 1)
    c_max = corrupt_holders_bound(num_clients, draws, corrupt_fraction, security_log2)
    if threat_model is ThreatModel.SEMI_HONEST:
        return c_max + 1
    return (draws + c_max) // 2 + 1


def failure_log2(
    num_clients: int,
    degree: int,
    threshold: int,
    *,
    dropout_fraction: float,
    corrupt_fraction: float,
    threat_model: ThreatModel,
) -> tuple[float, float]:
    """Return log2 of the (security, correctness) failure probabilities of a round."""
    others = num_clients - 1
    draws = min(degree, others)
    corrupt = corrupt_count(num_clients, corrupt_fraction)
    dropped = math.ceil(round(dropout_fraction * num_clients, 9))
    unsafe_from = threshold if threat_model is ThreatModel.SEMI_HONEST else 2 * threshold - draws
    security = num_clients * _tail_at_least(others, min(corrupt, others), draws, unsafe_from)
    # Correctness fails when more than draws - threshold holders dropped.
    correctness = num_clients * _tail_at_least(
        others, min(dropped, others), draws, draws - threshold + 1
    )
    return _log2(min(1.0, security)), _log2(min(1.0, correctness))


def choose_neighbourhood(
    num_clients: int,
    *,
    dropout_fraction: float = 0.1,
    corrupt_fraction: float = 0.1,
    threat_model: ThreatModel = ThreatModel.ACTIVE,
    sigma: int = 40,
    eta: int = 20,
) -> NeighbourhoodParams:
    """Return the smallest k (and the least safe t for it) meeting both bounds.

    Parameters
    ----------
    num_clients
        n, the clients that start the round (>= 2).
    dropout_fraction
        Fraction of them that may drop out during the round, in [0, 1).
    corrupt_fraction
        Fraction that may collude with the server, in [0, 1).
    threat_model
        What the server may do.
    sigma, eta
        Security and correctness parameters: failures at most 2^-sigma, 2^-eta.

    Raises
    ------
    ConfigError
        If the arguments are out of range or no k <= n - 1 satisfies the bounds
        (too many dropouts or corrupt clients for this n).
    """
    if num_clients < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {num_clients}")
    for name, value in (
        ("dropout_fraction", dropout_fraction),
        ("corrupt_fraction", corrupt_fraction),
    ):
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if sigma < 1 or eta < 1:
        raise ConfigError("sigma and eta must be >= 1")
    # The server's t must satisfy every device: each device checks t against
    # the per-device bound; a union over the n clients makes it 2^-sigma per round.
    per_device = sigma + math.log2(num_clients)
    for degree in range(1, num_clients):
        threshold = required_threshold(
            num_clients,
            degree,
            corrupt_fraction=corrupt_fraction,
            threat_model=threat_model,
            security_log2=per_device,
        )
        if threshold > degree:
            continue
        security, correctness = failure_log2(
            num_clients,
            degree,
            threshold,
            dropout_fraction=dropout_fraction,
            corrupt_fraction=corrupt_fraction,
            threat_model=threat_model,
        )
        if security <= -sigma and correctness <= -eta:
            return NeighbourhoodParams(num_clients, degree, threshold, security, correctness)
    raise ConfigError(
        f"no neighbourhood of {num_clients} clients tolerates {dropout_fraction:.0%} dropouts and "
        f"{corrupt_fraction:.0%} corrupt clients at sigma={sigma}, eta={eta}: "
        "lower the fractions or the parameters, or run with more clients"
    )
