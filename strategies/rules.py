"""Aggregation rules by name, with their options typed and validated.

A scenario names its server strategy (``[strategy] name = "fedadam"``); this
module says which rules exist, which options each takes and what each needs of
the run. The Flower strategy objects themselves are built on the server
(:mod:`fl_server.strategy_factory`), from Flower 1.42's ``flwr.serverapp.strategy``:

- **means**: FedAvg, FedProx (its ``proximal_mu`` travels to the devices, which
  add the proximal term to their local loss);
- **server optimisers** (Reddi et al., ICLR 2021): FedAdam, FedYogi, FedAdagrad,
  and FedAvgM (server momentum, Hsu et al. 2019);
- **robust rules**: FedTrimmedAvg and FedMedian (Yin et al., ICML 2018), Krum and
  MultiKrum (Blanchard et al., NeurIPS 2017), Bulyan (El Mhamdi et al., ICML 2018).

Notes
-----
A robust rule must see every device's update to discard outliers. Under secure
aggregation the server sees only the sum, and with central DP the DP wrapper
hands the strategy one noisy aggregate: a robust rule then has nothing to
choose from, so those combinations are refused (:meth:`StrategySpec.check_run`)
rather than run as a silent FedAvg. The defence that holds under secure
aggregation is norm bounding on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Final

from fedge.errors import ConfigError

__all__ = ["AggregationRule", "OptionValue", "StrategySpec"]

OptionValue = int | float
"""The type of a strategy option's value."""


class AggregationRule(Enum):
    """A server aggregation rule (``flwr.serverapp.strategy``)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    FEDAVGM = "fedavgm"
    TRIMMED_MEAN = "fedtrimmedavg"
    MEDIAN = "fedmedian"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    BULYAN = "bulyan"

    @property
    def robust(self) -> bool:
        """Whether the rule needs every device's own update (a Byzantine-robust rule)."""
        return self in _ROBUST


_ROBUST: Final = frozenset(
    {
        AggregationRule.TRIMMED_MEAN,
        AggregationRule.MEDIAN,
        AggregationRule.KRUM,
        AggregationRule.MULTIKRUM,
        AggregationRule.BULYAN,
    }
)


@dataclass(frozen=True, slots=True)
class _Option:
    kind: type[int] | type[float]
    low: float
    high: float
    low_open: bool = False

    def check(self, rule: AggregationRule, name: str, value: object) -> OptionValue:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{rule.value} option {name} must be a number, got {type(value).__name__}"
            )
        if self.kind is int and not isinstance(value, int):
            raise ConfigError(f"{rule.value} option {name} must be an integer, got {value!r}")
        if not math.isfinite(value) or not (
            (self.low < value if self.low_open else self.low <= value) and value <= self.high
        ):
            bracket = "(" if self.low_open else "["
            raise ConfigError(
                f"{rule.value} option {name} must be in {bracket}{self.low:g}, {self.high:g}], "
                f"got {value!r}"
            )
        return value if self.kind is int else float(value)


_RATE = _Option(float, 0.0, 10.0, low_open=True)
_BETA = _Option(float, 0.0, 1.0)
_TAU = _Option(float, 0.0, 1.0, low_open=True)
_MALICIOUS = _Option(int, 0, 1_000_000)

_OPTIONS: Final[dict[AggregationRule, dict[str, _Option]]] = {
    AggregationRule.FEDAVG: {},
    AggregationRule.FEDPROX: {"proximal_mu": _Option(float, 0.0, 1e4)},
    AggregationRule.FEDADAM: {"eta": _RATE, "beta_1": _BETA, "beta_2": _BETA, "tau": _TAU},
    AggregationRule.FEDYOGI: {"eta": _RATE, "beta_1": _BETA, "beta_2": _BETA, "tau": _TAU},
    AggregationRule.FEDADAGRAD: {"eta": _RATE, "tau": _TAU},
    AggregationRule.FEDAVGM: {
        "server_learning_rate": _RATE,
        "server_momentum": _Option(float, 0.0, 1.0),
    },
    AggregationRule.TRIMMED_MEAN: {"beta": _Option(float, 0.0, 0.4999)},
    AggregationRule.MEDIAN: {},
    AggregationRule.KRUM: {"num_malicious_nodes": _MALICIOUS},
    AggregationRule.MULTIKRUM: {
        "num_malicious_nodes": _MALICIOUS,
        "num_nodes_to_select": _Option(int, 1, 1_000_000),
    },
    AggregationRule.BULYAN: {"num_malicious_nodes": _MALICIOUS},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategySpec:
    """A server strategy: the rule and its options (Flower's keyword arguments).

    Parameters
    ----------
    rule
        The aggregation rule.
    options
        ``(name, value)`` pairs, sorted by name; each rule accepts only its own
        options (e.g. FedAdam: ``eta``, ``beta_1``, ``beta_2``, ``tau``).

    Raises
    ------
    ConfigError
        If an option is unknown to the rule, repeated, or out of its range.
    """

    rule: AggregationRule = AggregationRule.FEDAVG
    options: tuple[tuple[str, OptionValue], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.rule, AggregationRule):
            raise ConfigError(f"unknown aggregation rule {self.rule!r}")
        allowed = _OPTIONS[self.rule]
        names = [name for name, _ in self.options]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.rule.value}: an option is given twice: {names}")
        checked = []
        for name, value in sorted(self.options):
            option = allowed.get(name)
            if option is None:
                accepted = ", ".join(sorted(allowed)) or "none"
                raise ConfigError(
                    f"{self.rule.value} has no option {name!r} (it accepts: {accepted})"
                )
            checked.append((name, option.check(self.rule, name, value)))
        object.__setattr__(self, "options", tuple(checked))

    @classmethod
    def accepted_options(cls, rule: AggregationRule) -> tuple[str, ...]:
        """Return the option names ``rule`` accepts."""
        return tuple(sorted(_OPTIONS[rule]))

    @property
    def kwargs(self) -> dict[str, OptionValue]:
        """The options as keyword arguments of the Flower strategy."""
        return dict(self.options)

    def check_run(self, *, secure_aggregation: bool, central_dp: bool, sampled: int) -> None:
        """Refuse combinations where the rule cannot do what it says.

        Parameters
        ----------
        secure_aggregation
            The run aggregates under SecAgg+ (the server sees only the sum).
        central_dp
            The run adds central DP noise to one aggregate.
        sampled
            Devices sampled per round.

        Raises
        ------
        ConfigError
            If a robust rule would see one aggregate, or has too few updates to
            tolerate the malicious devices it is told of.
        """
        if not self.rule.robust:
            return
        if secure_aggregation:
            raise ConfigError(
                f"{self.rule.value} must see every device's update, and under secure "
                "aggregation the server sees only their sum: use norm bounding on the "
                "devices instead (see docs/attacks.md)"
            )
        if central_dp:
            raise ConfigError(
                f"{self.rule.value} would see one noisy aggregate under central DP: "
                "use a mean or a server optimiser"
            )
        malicious = int(self.kwargs.get("num_malicious_nodes", 0))
        if self.rule in (AggregationRule.KRUM, AggregationRule.MULTIKRUM):
            # Krum scores each update by its n - f - 2 nearest neighbours.
            needed = 2 * malicious + 3
        elif self.rule is AggregationRule.BULYAN:
            needed = 4 * malicious + 3  # El Mhamdi et al.: n >= 4f + 3
        else:
            needed = 1
        if sampled < needed:
            raise ConfigError(
                f"{self.rule.value} with num_malicious_nodes={malicious} needs at least "
                f"{needed} devices per round, got {sampled}"
            )

    def to_json(self) -> dict[str, object]:
        """Return the spec as JSON-ready values."""
        return {"name": self.rule.value, "options": dict(self.options)}
