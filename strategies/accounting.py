"""Privacy accounting: the subsampled Gaussian through Opacus, the distributed discrete Gaussian.

Three mechanisms, three analyses:

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
- **A rho-zCDP mechanism on a Poisson sample** (sample-level DP under secure
  aggregation: each device draws its own examples with its own CSPRNG, so the
  sample stays secret and amplification holds): the discrete Gaussian's curve is
  zCDP, not the Gaussian's, so Opacus' sampled-Gaussian analysis does not apply.
  :func:`subsampled_zcdp_epsilon` uses the bound of Zhu and Wang (ICML 2019,
  Theorem 6), valid for any base mechanism; its factor 3 is the price of that
  generality (for the continuous Gaussian: 10-60% above Opacus' exact analysis
  at noise multipliers 0.8-2, 2.6x at 5 with q = 0.01), and
  :func:`subsampled_zcdp_noise_multiplier` inverts it.

zCDP converts to (epsilon, delta) through its RDP curve (rho * alpha at every
order alpha) and Opacus' RDP-to-DP conversion, so all three are reported
on the same scale.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from strategies.records import check_noise_multiplier

__all__ = [
    "AccountantKind",
    "GaussianSteps",
    "PrivacySpend",
    "composed_epsilon",
    "ddg_rho",
    "gaussian_epsilon",
    "least_noise",
    "merged_steps",
    "spent_epsilon",
    "subsampled_zcdp_epsilon",
    "subsampled_zcdp_noise_multiplier",
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


def merged_steps(events: Sequence[GaussianSteps]) -> list[GaussianSteps]:
    """Return ``events`` with equal (multiplier, rate) pairs merged into one event.

    Exact: the RDP of ``steps`` compositions is ``steps`` times one step's, and PRV
    composes the same way. A ledger of one event a round (shared-noise DP-SGD, central
    DP) would otherwise cost O(rounds) accountant calls at every round.
    """
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        key = (event.noise_multiplier, event.sample_rate)
        steps[key] = steps.get(key, 0) + event.steps
    return [
        GaussianSteps(noise_multiplier=z, sample_rate=q, steps=count)
        for (z, q), count in steps.items()
    ]


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
    accountant.history = [
        (e.noise_multiplier, e.sample_rate, e.steps) for e in merged_steps(history)
    ]
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
    gaussian = merged_steps(gaussian)
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


# Integer orders for the subsampled zCDP bound (Zhu and Wang's Theorem 6 holds at
# integer orders >= 2 only): every integer to 256, then a geometric grid to ~1.1e4
# for small rho * q. Its sum is O(alpha) per order, ~9e4 terms in all.
_SUBSAMPLED_ORDERS = tuple(range(2, 257)) + tuple(round(256 * 1.25**i) for i in range(1, 18))
_LOG_3 = math.log(3.0)
# The noise multipliers subsampled_zcdp_noise_multiplier searches, and its tolerance.
_MIN_SEARCH_Z = 1e-3
_MAX_SEARCH_Z = 1e4
_SEARCH_RTOL = 1e-3


@dataclass(frozen=True, slots=True)
class _BinomialTerms:
    """The (alpha, l) pairs of Theorem 6's sums, l = 2..alpha, flattened order by order."""

    orders: npt.NDArray[np.float64]
    starts: npt.NDArray[np.intp]  # where each order's terms begin (np.*.reduceat)
    order_index: npt.NDArray[np.intp]  # which order each term belongs to
    order_of_term: npt.NDArray[np.float64]
    ell: npt.NDArray[np.float64]
    log_binomial: npt.NDArray[np.float64]  # log C(alpha, l)


@functools.cache
def _binomial_terms() -> _BinomialTerms:
    top = max(_SUBSAMPLED_ORDERS)
    log_factorial = np.array([math.lgamma(k + 1) for k in range(top + 1)])
    counts = np.array([a - 1 for a in _SUBSAMPLED_ORDERS])  # l = 2..alpha
    order_index = np.repeat(np.arange(len(_SUBSAMPLED_ORDERS)), counts)
    alpha = np.repeat(np.array(_SUBSAMPLED_ORDERS), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    ell = np.arange(len(alpha)) - starts[order_index] + 2
    return _BinomialTerms(
        orders=np.array(_SUBSAMPLED_ORDERS, dtype=np.float64),
        starts=starts,
        order_index=order_index,
        order_of_term=alpha.astype(np.float64),
        ell=ell.astype(np.float64),
        log_binomial=log_factorial[alpha] - log_factorial[ell] - log_factorial[alpha - ell],
    )


def _subsampled_zcdp_rdp(rho: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """Return one step's RDP bound at each of ``_SUBSAMPLED_ORDERS`` (Theorem 6, log space).

    Zhu and Wang, "Poisson Subsampled Renyi Differential Privacy" (ICML 2019),
    Theorem 6: for any mechanism with RDP eps(l) under add/remove-one adjacency,
    Poisson sampling at rate q and integer alpha >= 2,

        eps'(alpha) <= log( (1-q)^(alpha-1) (alpha q - q + 1)
                            + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                            + 3 sum_{l=3}^{alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)} )
                       / (alpha - 1),

    here with eps(l) = rho * l. The paper's abstract states the same bound's gap
    to the exact value as log(3) / (alpha - 1), i.e. this factor 3. autodp's
    ``compose_poisson_subsampled_mechanisms1`` (yuxiangw/autodp, rdp_acct.py)
    writes its l >= 3 terms instead as e^{l eps(l+1)} with no factor 3: neither
    expression dominates the other, and the paper's is the proved one, so we
    follow the paper. Each order's value is also capped at rho * alpha, since
    subsampling cannot hurt (Renyi divergence is jointly quasi-convex: van Erven
    and Harremoes 2014, Theorem 13).
    """
    terms = _binomial_terms()
    log_q = math.log(sample_rate)
    log_1mq = math.log1p(-sample_rate)
    ell = terms.ell
    log_terms = (
        terms.log_binomial
        + ell * log_q
        + (terms.order_of_term - ell) * log_1mq
        + (ell - 1) * ell * rho
        + np.where(ell >= 3, _LOG_3, 0.0)
    )
    alpha = terms.orders
    # (1-q)^(alpha-1) (alpha q - q + 1), the l = 0 and l = 1 terms together.
    head = (alpha - 1) * log_1mq + np.log1p((alpha - 1) * sample_rate)
    peak = np.maximum(np.maximum.reduceat(log_terms, terms.starts), head)
    total = np.add.reduceat(np.exp(log_terms - peak[terms.order_index]), terms.starts)
    log_moment = peak + np.log(total + np.exp(head - peak))
    bound: npt.NDArray[np.float64] = np.minimum(log_moment / (alpha - 1), rho * alpha)
    return bound


def subsampled_zcdp_epsilon(*, rho: float, sample_rate: float, steps: int, delta: float) -> float:
    """Return epsilon(delta) after ``steps`` rho-zCDP mechanisms, each on a Poisson sample.

    Each step's RDP is bounded by Zhu and Wang's general bound (ICML 2019,
    Theorem 6) at integer orders 2..~1.1e4, multiplied by ``steps`` and
    converted with Opacus' RDP-to-DP conversion, as :func:`zcdp_epsilon` does.
    The result never exceeds ``zcdp_epsilon(rho * steps)``, the same mechanism
    without sampling, which it returns for ``sample_rate == 1``. The bound holds
    for any mechanism whose RDP is at most ``rho * alpha`` under add/remove-one
    adjacency (the distributed discrete Gaussian: :func:`ddg_rho`), and only if
    the sample is secret and truly Poisson.

    Parameters
    ----------
    rho
        One step's zCDP parameter, a finite number > 0.
    sample_rate
        Probability that each record is in a step's sample, in (0, 1].
    steps
        How many steps compose, >= 1.
    delta
        The target delta, in (0, 1).

    Raises
    ------
    ConfigError
        If an argument is out of range (the message names it).
    """
    if not (math.isfinite(rho) and rho > 0):
        raise ConfigError(f"rho must be a finite number > 0, got {rho}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    _check_delta(delta)
    if sample_rate == 1:
        return zcdp_epsilon(rho * steps, delta=delta)
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = steps * _subsampled_zcdp_rdp(rho, sample_rate)
    with warnings.catch_warnings():
        # Opacus warns when the best order is a grid's first or last. Of the two
        # bounds the smaller is returned, and the unsampled one has fractional
        # orders below 2, so the warning would name no useful fix here.
        warnings.simplefilter("ignore", UserWarning)
        unsampled = zcdp_epsilon(rho * steps, delta=delta)
        epsilon, _ = rdp_analysis.get_privacy_spent(
            orders=_binomial_terms().orders, rdp=curve, delta=delta
        )
    return min(float(epsilon), unsampled)


def subsampled_zcdp_noise_multiplier(
    *, target_epsilon: float, sample_rate: float, steps: int, delta: float
) -> float:
    """Return the smallest noise multiplier z whose subsampled epsilon meets the target.

    z is Gaussian-style: rho = 1 / (2 z^2) per step, accounted by
    :func:`subsampled_zcdp_epsilon`. Bisection on log z over [1e-3, 1e4] to a
    relative tolerance of 1e-3; the returned z meets the target, and z / 1.001
    does not (unless z is the search's lower end, 1e-3).

    Raises
    ------
    ConfigError
        If an argument is out of range, or if even z = 1e4 does not meet the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")

    def epsilon(z: float) -> float:
        return subsampled_zcdp_epsilon(
            rho=1 / (2 * z * z), sample_rate=sample_rate, steps=steps, delta=delta
        )

    z = least_noise(epsilon, target_epsilon, low=_MIN_SEARCH_Z, high=_MAX_SEARCH_Z)
    if z is None:
        raise ConfigError(
            f"no noise multiplier up to {_MAX_SEARCH_Z:g} meets target_epsilon="
            f"{target_epsilon:g} (sample_rate={sample_rate:g}, steps={steps}, delta={delta:g})"
        )
    return z


def least_noise(
    epsilon_of: Callable[[float], float], target: float, *, low: float, high: float
) -> float | None:
    """Return the smallest multiplier in [low, high] whose epsilon meets ``target`` (to 0.1 %).

    Bisection on log z (epsilon decreases in z): the result meets the target and
    z / 1.001 does not, unless it is ``low``. ``None`` if even ``high`` misses it.
    """
    if epsilon_of(high) > target:
        return None
    if epsilon_of(low) <= target:
        return low
    # Invariant: epsilon(low) > target >= epsilon(high).
    while high > low * (1 + _SEARCH_RTOL):
        middle = math.sqrt(low * high)
        if epsilon_of(middle) <= target:
            high = middle
        else:
            low = middle
    return high
