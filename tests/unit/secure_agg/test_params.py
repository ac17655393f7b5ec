from __future__ import annotations

import math

import pytest

from fedge.errors import ConfigError
from secure_agg.params import (
    ThreatModel,
    choose_neighbourhood,
    corrupt_count,
    corrupt_holders_bound,
    failure_log2,
    required_threshold,
)


@pytest.mark.parametrize("threat_model", list(ThreatModel))
def test_chosen_parameters_meet_both_bounds(threat_model: ThreatModel) -> None:
    params = choose_neighbourhood(
        1000, dropout_fraction=0.05, corrupt_fraction=0.05, threat_model=threat_model
    )

    assert params.security_log2 <= -40
    assert params.correctness_log2 <= -20
    assert params.threshold <= params.degree
    # The least threshold a device with the same assumptions accepts, per device.
    least = required_threshold(
        1000,
        params.degree,
        corrupt_fraction=0.05,
        threat_model=threat_model,
        security_log2=40,
    )
    assert least <= params.threshold
    # SecAgg+'s point: logarithmic, not linear, neighbourhoods.
    assert params.degree < 300
    assert not params.is_complete


def test_the_chosen_degree_is_minimal() -> None:
    params = choose_neighbourhood(500, dropout_fraction=0.05, corrupt_fraction=0.05)
    smaller = params.degree - 1

    for threshold in range(1, smaller + 1):
        security, correctness = failure_log2(
            500,
            smaller,
            threshold,
            dropout_fraction=0.05,
            corrupt_fraction=0.05,
            threat_model=ThreatModel.ACTIVE,
        )
        assert security > -40 or correctness > -20


def test_active_model_needs_at_least_as_many_neighbours_as_semi_honest() -> None:
    active = choose_neighbourhood(1000, threat_model=ThreatModel.ACTIVE)
    semi = choose_neighbourhood(1000, threat_model=ThreatModel.SEMI_HONEST)

    assert active.degree >= semi.degree


def test_small_federations_fall_back_to_the_complete_graph() -> None:
    # 3 dropouts and 2 corrupt clients out of 10: with 8 holders no threshold
    # is both reachable (t <= 5) and safe (2t > 8 + 2); with all 9 t = 6 is.
    params = choose_neighbourhood(10, dropout_fraction=0.3, corrupt_fraction=0.2)

    assert params.is_complete
    assert (params.degree, params.threshold) == (9, 6)


def test_the_corrupt_count_rounds_up() -> None:
    # 10 % of 9 clients is 0.9 of a client: one may be corrupt, not none.
    assert corrupt_count(9, 0.1) == 1
    assert corrupt_count(30, 0.1) == 3  # not 4 from 3.0000000000000004
    assert corrupt_count(10, 0.0) == 0


def test_the_threshold_rule_per_threat_model() -> None:
    # 10 clients, 1 corrupt: at most one corrupt holder, whatever k.
    assert corrupt_holders_bound(10, 6, 0.1, 40) == 1
    semi = required_threshold(
        10, 6, corrupt_fraction=0.1, threat_model=ThreatModel.SEMI_HONEST, security_log2=40
    )
    active = required_threshold(
        10, 6, corrupt_fraction=0.1, threat_model=ThreatModel.ACTIVE, security_log2=40
    )
    assert (semi, active) == (2, 4)  # t > c_max; t >= floor((k + c_max) / 2) + 1
    # 1000 clients, 10 % corrupt, 40 holders: c_max is a high quantile, not 4.
    c_max = corrupt_holders_bound(1000, 40, 0.1, 40)
    assert 15 <= c_max <= 25


def test_no_corrupt_clients_means_no_security_failure() -> None:
    security, _ = failure_log2(
        100, 10, 6, dropout_fraction=0.1, corrupt_fraction=0.0, threat_model=ThreatModel.ACTIVE
    )

    assert security == -math.inf


def test_more_dropouts_make_correctness_worse() -> None:
    def correctness(dropout: float) -> float:
        return failure_log2(
            200,
            40,
            22,
            dropout_fraction=dropout,
            corrupt_fraction=0.0,
            threat_model=ThreatModel.SEMI_HONEST,
        )[1]

    assert correctness(0.05) < correctness(0.1) < correctness(0.2) < 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 1}, "at least 2 clients, got 1"),
        ({"num_clients": 10, "dropout_fraction": 1.0}, r"dropout_fraction must be in \[0, 1\)"),
        ({"num_clients": 10, "corrupt_fraction": -0.1}, r"corrupt_fraction must be in \[0, 1\)"),
        ({"num_clients": 10, "sigma": 0}, "sigma and eta must be >= 1"),
        ({"num_clients": 20, "dropout_fraction": 0.6, "corrupt_fraction": 0.3}, "no neighbourhood"),
    ],
)
def test_impossible_requests_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        choose_neighbourhood(**kwargs)  # type: ignore[arg-type]
