"""StrategySpec: each rule takes only its own options and refuses runs it cannot serve."""

from __future__ import annotations

import pytest

from fedge.errors import ConfigError
from strategies.rules import AggregationRule, StrategySpec


def test_options_are_checked_sorted_and_typed() -> None:
    spec = StrategySpec(rule=AggregationRule.FEDADAM, options=(("tau", 1e-3), ("eta", 1)))

    assert spec.options == (("eta", 1.0), ("tau", 1e-3))
    assert isinstance(spec.kwargs["eta"], float)
    assert spec.to_json() == {"name": "fedadam", "options": {"eta": 1.0, "tau": 1e-3}}


@pytest.mark.parametrize(
    ("rule", "options", "match"),
    [
        (
            AggregationRule.FEDAVG,
            (("eta", 0.1),),
            r"fedavg has no option 'eta' \(it accepts: none\)",
        ),
        (
            AggregationRule.FEDADAM,
            (("proximal_mu", 0.1),),
            "fedadam has no option 'proximal_mu' .*beta_1, beta_2, eta, tau",
        ),
        (AggregationRule.FEDADAM, (("eta", 0.0),), r"eta must be in \(0, 10\], got 0.0"),
        (AggregationRule.FEDPROX, (("proximal_mu", -1.0),), r"proximal_mu must be in \[0"),
        (AggregationRule.FEDPROX, (("proximal_mu", True),), "must be a number, got bool"),
        (AggregationRule.KRUM, (("num_malicious_nodes", 1.5),), "must be an integer"),
        (AggregationRule.TRIMMED_MEAN, (("beta", 0.5),), "beta must be in"),
        (AggregationRule.FEDAVGM, (("server_momentum", float("nan")),), "server_momentum"),
        (AggregationRule.FEDYOGI, (("eta", 0.1), ("eta", 0.2)), "given twice"),
    ],
)
def test_bad_options_are_refused_with_the_rule_and_option_named(
    rule: AggregationRule, options: tuple[tuple[str, float], ...], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        StrategySpec(rule=rule, options=options)


def test_robust_rules_are_refused_where_they_would_see_one_aggregate() -> None:
    spec = StrategySpec(rule=AggregationRule.MEDIAN)

    with pytest.raises(ConfigError, match="under secure aggregation the server sees only"):
        spec.check_run(secure_aggregation=True, central_dp=False, sampled=10)
    with pytest.raises(ConfigError, match="one noisy aggregate under central DP"):
        spec.check_run(secure_aggregation=False, central_dp=True, sampled=10)
    spec.check_run(secure_aggregation=False, central_dp=False, sampled=10)
    # Means and server optimisers are fine under both.
    StrategySpec(rule=AggregationRule.FEDADAM).check_run(
        secure_aggregation=True, central_dp=True, sampled=3
    )


@pytest.mark.parametrize(
    ("rule", "malicious", "enough"),
    [
        (AggregationRule.KRUM, 2, 7),
        (AggregationRule.MULTIKRUM, 1, 5),
        (AggregationRule.BULYAN, 1, 7),
    ],
)
def test_byzantine_tolerant_rules_need_enough_devices_per_round(
    rule: AggregationRule, malicious: int, enough: int
) -> None:
    spec = StrategySpec(rule=rule, options=(("num_malicious_nodes", malicious),))

    spec.check_run(secure_aggregation=False, central_dp=False, sampled=enough)
    with pytest.raises(ConfigError, match=f"needs at least {enough} devices per round"):
        spec.check_run(secure_aggregation=False, central_dp=False, sampled=enough - 1)


def test_only_the_robust_rules_say_so() -> None:
    robust = {rule.value for rule in AggregationRule if rule.robust}

    assert robust == {"fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan"}
    assert StrategySpec.accepted_options(AggregationRule.FEDAVGM) == (
        "server_learning_rate",
        "server_momentum",
    )
