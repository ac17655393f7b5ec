"""Privacy accounting: the subsampled Gaussian through Opacus, the distributed discrete Gaussian.

Two mechanisms, two analyses:

- **Gaussian noise with Poisson sampling** (central DP with client sampling,
  DP-SGD on devices): Opacus' accountants on the list of (noise multiplier,
  sample rate, steps) events. ``RDP`` (Mironov et al. 2019) is the classic;
  ``PRV`` (Gopi et al. 2021) is tighter. Sampling amplifies privacy only if the
  sample is secret and truly Poisson: a deployment whose server picks the
  clients (Flower's ``sample_nodes``) must account with ``sample_rate = 1``.
- **Distributed discrete Gaussian** (each of n clients adds N_Z(0, sigma^2) to
  its integer update under secure aggregation): Theorem 1 of Kairouz, Liu and
  Steinke (ICML 2021) gives (eps^2 / 2)-concentrated DP per round with
  eps = min(sqrt(D2^2 / (n sigma^2) + tau D1 / 2), D2 / (sqrt(n) sigma) + tau sqrt(d)),
  tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)), D1 and D2 the L1 and
  L2 sensitivities of one client's integer vector, d its dimension.
  Rounds compose by adding rho; no amplification by sampling is claimed.

zCDP converts to (epsilon, delta) through its RDP curve (rho * alpha at every
order alpha) and Opacus' RDP-to-DP conversion, so both mechanisms are reported
on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fedge.errors import ConfigError
from strategies.records import check_noise_multiplier

__all__ = [
    "AccountantKind",
    "GaussianSteps",
    "PrivacySpend",
    "composed_epsilon",
    "ddg_rho",
    "gaussian_epsilon",
    "spent_epsilon",
    "zcdp_epsilon",
]

# A small rho or few steps put the optimal order high, many steps low; a grid that
# ends too early overstates epsilon. zCDP's curve is closed-form, so its grid reaches
# 10^6; the subsampled Gaussian's RDP costs O(alpha) per integer order in Opacus,
# so its grid stops at 256.
_GAUSSIAN_ORDERS = (
    [1 + x / 100.0 for x in range(1, 10)]
    + [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [80.0, 128.0, 256.0]
)
_ORDERS = _GAUSSIAN_ORDERS + [float(round(256 * 1.25**i)) for i in range(1, 37)]


# Opacus' PRV accountant needs gigabytes (or returns inf) for small noise multipliers
# (measured here: 2 GB at 0.05, 1.6 GB at 0.3 over 1000 steps); below this, use RDP.
_PRV_MIN_NOISE = 0.5


class AccountantKind(Enum):
    """Which analysis of the subsampled Gaussian to use."""

    RDP = "rdp"
    PRV = "prv"


@dataclass(frozen=True, slots=True, kw_only=True)
class GaussianSteps:
    """``steps`` applications of the Gaussian mechanism with Poisson sampling.

    Parameters
    ----------
    noise_multiplier
        Noise standard deviation over the L2 sensitivity, > 0.
    sample_rate
        Probability that each record (client) is in a step, in (0, 1].
    steps
        How many such steps, >= 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        check_noise_multiplier(self.noise_multiplier)
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacySpend:
    """What one round costs a subject: a zCDP rho, a (subsampled) Gaussian event, or both.

    Both ledgers store these: the server's (per run and client) and each device's own.
    """

    mechanism: str
    rho: float = 0.0
    gaussian: GaussianSteps | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.mechanism) <= 32:
            raise ConfigError("the mechanism name has 1..32 characters")
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise ConfigError(f"rho must be a finite number >= 0, got {self.rho}")
        if self.rho == 0 and self.gaussian is None:
            raise ConfigError("a spend needs a rho > 0 or a Gaussian event")

    def to_json(self) -> dict[str, Any]:
        """Return the spend as flat JSON values (the Gaussian's fields None when absent)."""
        event = self.gaussian
        return {
            "mechanism": self.mechanism,
            "rho": self.rho,
            "noise_multiplier": None if event is None else event.noise_multiplier,
            "sample_rate": None if event is None else event.sample_rate,
            "steps": None if event is None else event.steps,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PrivacySpend:
        """Parse what :meth:`to_json` wrote (or a ledger row's columns).

        Raises
        ------
        ConfigError
            If a value is out of range.
        """
        event = None
        if raw.get("noise_multiplier") is not None:
            event = GaussianSteps(
                noise_multiplier=float(raw["noise_multiplier"]),
                sample_rate=float(raw["sample_rate"]),
                steps=int(raw["steps"]),
            )
        return cls(mechanism=str(raw["mechanism"]), rho=float(raw["rho"]), gaussian=event)


def spent_epsilon(
    spends: Sequence[PrivacySpend], *, delta: float, kind: AccountantKind = AccountantKind.RDP
) -> float:
    """Return epsilon(delta) of all ``spends`` composed (:func:`composed_epsilon`)."""
    rho = sum(s.rho for s in spends)
    events = [s.gaussian for s in spends if s.gaussian is not None]
    return composed_epsilon(rho=rho, gaussian=events, delta=delta, kind=kind)


def _check_rho(rho: float) -> None:
    if not (math.isfinite(rho) and rho >= 0):
        raise ConfigError(f"rho must be a finite number >= 0, got {rho}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def gaussian_epsilon(
    history: Sequence[GaussianSteps],
    *,
    delta: float,
    kind: AccountantKind = AccountantKind.RDP,
) -> float:
    """Return epsilon(delta) after every event of ``history`` (0 for no events).

    Raises
    ------
    ConfigError
        If ``delta`` is outside (0, 1).
    """
    _check_delta(delta)
    if not history:
        return 0.0
    # Imported here: opacus pulls in torch, which importing `strategies` should not.
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = RDPAccountant() if kind is AccountantKind.RDP else PRVAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    if isinstance(accountant, RDPAccountant):
        return float(accountant.get_epsilon(delta, alphas=_GAUSSIAN_ORDERS))
    return float(accountant.get_epsilon(delta))


def ddg_rho(
    *,
    l2_sensitivity: float,
    l1_sensitivity: float,
    sigma: float,
    num_clients: int,
    dimension: int,
) -> float:
    """Return rho of the rho-zCDP one distributed-discrete-Gaussian round guarantees.

    Parameters
    ----------
    l2_sensitivity, l1_sensitivity
        How far one client's integer vector can move the sum, in L2 and L1.
    sigma
        The scale of each client's discrete Gaussian noise, >= 1/2 (where Kairouz
        et al.'s Theorem 1 holds).
    num_clients
        n, the clients whose noise is in the sum (count only the survivors).
    dimension
        d, the length of the integer vector.
    """
    if min(l2_sensitivity, l1_sensitivity, sigma) <= 0 or not all(
        math.isfinite(v) for v in (l2_sensitivity, l1_sensitivity, sigma)
    ):
        raise ConfigError("sensitivities and sigma must be finite numbers > 0")
    if sigma < 0.5:
        raise ConfigError(f"the discrete Gaussian bound needs sigma >= 1/2, got {sigma:.3g}")
    if num_clients < 1 or dimension < 1:
        raise ConfigError("num_clients and dimension must be >= 1")
    n = num_clients
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
    first = math.sqrt(l2_sensitivity**2 / (n * sigma**2) + tau * l1_sensitivity / 2)
    second = l2_sensitivity / (math.sqrt(n) * sigma) + tau * math.sqrt(dimension)
    eps = min(first, second)
    return eps * eps / 2


def zcdp_epsilon(rho: float, *, delta: float) -> float:
    """Return epsilon(delta) of rho-zCDP (through its RDP curve rho * alpha).

    Raises
    ------
    ConfigError
        If ``rho`` is negative or ``delta`` is outside (0, 1).
    """
    _check_delta(delta)
    _check_rho(rho)
    if rho == 0:
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    epsilon, _ = rdp_analysis.get_privacy_spent(
        orders=_ORDERS, rdp=[rho * alpha for alpha in _ORDERS], delta=delta
    )
    return float(epsilon)


def composed_epsilon(
    *,
    rho: float = 0.0,
    gaussian: Sequence[GaussianSteps] = (),
    delta: float,
    kind: AccountantKind = AccountantKind.RDP,
) -> float:
    """Return epsilon(delta) of zCDP rounds (total ``rho``) composed with Gaussian events.

    Both are added as RDP curves (rho * alpha, and Opacus' subsampled-Gaussian
    RDP) on one grid of orders, then converted once, so a run that mixes
    mechanisms is accounted as a whole. With ``kind=PRV``, no zCDP part and noise
    multipliers >= 0.5, the Gaussian events go to Opacus' PRV accountant instead
    (tighter, ~0.2-2 s a call); RDP is a valid, looser bound, so falling back is safe.

    Raises
    ------
    ConfigError
        If ``rho`` is negative or ``delta`` is outside (0, 1).
    """
    _check_delta(delta)
    _check_rho(rho)
    if rho == 0 and not gaussian:
        return 0.0
    if (
        kind is AccountantKind.PRV
        and rho == 0
        and all(e.noise_multiplier >= _PRV_MIN_NOISE for e in gaussian)
    ):
        return gaussian_epsilon(gaussian, delta=delta, kind=AccountantKind.PRV)
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = [rho * alpha for alpha in _GAUSSIAN_ORDERS]
    for event in gaussian:
        event_rdp = rdp_analysis.compute_rdp(
            q=event.sample_rate,
            noise_multiplier=event.noise_multiplier,
            steps=event.steps,
            orders=_GAUSSIAN_ORDERS,
        )
        curve = [a + float(b) for a, b in zip(curve, event_rdp, strict=True)]
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=_GAUSSIAN_ORDERS, rdp=curve, delta=delta)
    return float(epsilon)
