"""Choose the SecAgg+ neighbour count k and threshold t from the round's size and risks.

Bell et al. (CCS 2020) pick k = O(log n) and t so that, with high probability,
(a) every surviving client keeps at least t surviving neighbours (the round
completes: correctness failure at most 2^-eta) and (b) no client's neighbours
include enough corrupt clients to reveal its input (security failure at most
2^-sigma). In a random Harary graph the neighbours of any fixed node are a
uniformly random k-subset of the other n - 1 nodes, so the number of corrupt
(or surviving) neighbours is hypergeometric; a union bound over the n nodes
gives the round-level probabilities computed here exactly with integers.

Notes
-----
Security condition per threat model, for a node with c corrupt neighbours:
- semi-honest server: c < t (corrupt clients alone cannot reconstruct);
- active server: k + c < 2t. Honest neighbours reveal either the self-mask share
  or the masking-key share of a node, never both; a server that lies about who
  dropped needs t of each, so it needs honest + 2c >= 2t shares. The consistency
  check stops it from showing different survivor sets to different clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import cache

from fedge.errors import ConfigError

__all__ = ["NeighbourhoodParams", "ThreatModel", "choose_neighbourhood", "failure_log2"]


class ThreatModel(Enum):
    """What the server may do."""

    SEMI_HONEST = "semi-honest"
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class NeighbourhoodParams:
    """Neighbours per client and reconstruction threshold, with their failure bounds (log2)."""

    num_clients: int
    degree: int
    threshold: int
    security_log2: float
    correctness_log2: float

    @property
    def is_complete(self) -> bool:
        """True when every client neighbours every other (classic SecAgg)."""
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
    corrupt = math.floor(corrupt_fraction * num_clients)
    dropped = math.ceil(dropout_fraction * num_clients)
    unsafe_from = threshold if threat_model is ThreatModel.SEMI_HONEST else 2 * threshold - draws
    security = num_clients * _tail_at_least(others, min(corrupt, others), draws, unsafe_from)
    # Correctness fails when more than draws - threshold neighbours dropped.
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
    """Return the smallest even k (and a t for it) meeting both bounds.

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
    others = num_clients - 1
    candidates = [*range(2, others, 2), others]
    for degree in candidates:
        for threshold in range(degree // 2 + 1, degree + 1):
            security, correctness = failure_log2(
                num_clients,
                degree,
                threshold,
                dropout_fraction=dropout_fraction,
                corrupt_fraction=corrupt_fraction,
                threat_model=threat_model,
            )
            if security > -sigma:
                continue  # a larger threshold is safer; keep looking
            if correctness <= -eta:
                return NeighbourhoodParams(num_clients, degree, threshold, security, correctness)
            break  # larger thresholds only hurt correctness: try a larger degree
    raise ConfigError(
        f"no neighbourhood of {num_clients} clients tolerates {dropout_fraction:.0%} dropouts and "
        f"{corrupt_fraction:.0%} corrupt clients at sigma={sigma}, eta={eta}: "
        "lower the fractions or the parameters, or run with more clients"
    )
