"""Build the Flower strategy a :class:`strategies.rules.StrategySpec` names.

Every rule is Flower 1.42's own ``flwr.serverapp.strategy`` class, given the
run's sampling and the spec's options; DP is composed around it as a wrapper
(:class:`fl_server.dp_strategy.DifferentialPrivacy`), never by subclassing.
"""

from __future__ import annotations

from typing import Any, Final

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedge.errors import ConfigError
from strategies.rules import AggregationRule, StrategySpec

__all__ = ["build_strategy", "strategy_class"]

_CLASSES: Final[dict[AggregationRule, type[FedAvg]]] = {
    AggregationRule.FEDAVG: FedAvg,
    AggregationRule.FEDPROX: FedProx,
    AggregationRule.FEDADAM: FedAdam,
    AggregationRule.FEDYOGI: FedYogi,
    AggregationRule.FEDADAGRAD: FedAdagrad,
    AggregationRule.FEDAVGM: FedAvgM,
    AggregationRule.TRIMMED_MEAN: FedTrimmedAvg,
    AggregationRule.MEDIAN: FedMedian,
    AggregationRule.KRUM: Krum,
    AggregationRule.MULTIKRUM: MultiKrum,
    AggregationRule.BULYAN: Bulyan,
}


def strategy_class(rule: AggregationRule) -> type[FedAvg]:
    """Return the Flower class of ``rule``."""
    return _CLASSES[rule]


def build_strategy(spec: StrategySpec, **sampling: Any) -> Strategy:
    """Return ``spec``'s Flower strategy with the run's ``sampling`` keyword arguments.

    Raises
    ------
    ConfigError
        If Flower refuses the options.
    """
    cls = _CLASSES[spec.rule]
    options: dict[str, Any] = {**sampling, **spec.kwargs}
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {spec.rule.value}: {exc}") from exc
