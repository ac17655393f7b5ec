"""SimConfig: secure-aggregation settings are checked before anything starts."""

from __future__ import annotations

import pytest

from fedge.errors import ConfigError
from secure_agg.params import ThreatModel
from simulations.config import DpMode, SimConfig


def test_a_federation_too_small_for_the_dropout_tolerance_fails_early_with_advice() -> None:
    with pytest.raises(ConfigError, match="pass --secagg-dropout 0"):
        SimConfig(num_clients=3, secure_agg=True, secagg_dropout=0.2)


@pytest.mark.parametrize(
    ("clients", "fraction", "tolerance"),
    [(3, 1.0, 0.0), (5, 1.0, 0.2), (6, 1.0, 0.1), (10, 1.0, 0.2)],
)
def test_an_unset_dropout_tolerance_is_the_largest_the_sampled_clients_allow(
    clients: int, fraction: float, tolerance: float
) -> None:
    config = SimConfig(num_clients=clients, fraction_train=fraction, secure_agg=True)

    assert config.dropout_tolerance == tolerance
    assert config.secure_config(authority_public_key=bytes(32)).dropout_fraction == tolerance
    assert config.to_json()["secagg_dropout"] == tolerance


def test_two_sampled_clients_cannot_aggregate_securely_and_the_error_says_so() -> None:
    with pytest.raises(ConfigError, match="sample at least 3"):
        SimConfig(num_clients=10, fraction_train=0.2, secure_agg=True)


def test_small_federations_run_without_dropout_tolerance() -> None:
    config = SimConfig(num_clients=3, secure_agg=True, secagg_dropout=0.0)

    secure = config.secure_config(authority_public_key=bytes(32))

    assert secure.dropout_fraction == 0.0
    assert secure.threat_model is ThreatModel.ACTIVE


@pytest.mark.parametrize("threat", list(ThreatModel))
def test_only_a_semi_honest_simulation_lets_the_server_draw_the_graph(threat: ThreatModel) -> None:
    config = SimConfig(num_clients=6, secure_agg=True, threat_model=threat)
    authority = None if threat is ThreatModel.SEMI_HONEST else b"k" * 32

    secure = config.secure_config(authority_public_key=authority)
    policy = config.device_policy(authority_public_key=authority)

    semi_honest = threat is ThreatModel.SEMI_HONEST
    assert secure.prekeys and secure.server_graph is semi_honest
    assert policy.protocol is not None
    assert policy.protocol.accept_server_graph is semi_honest


def test_secure_settings_are_validated_and_serialised() -> None:
    with pytest.raises(ConfigError, match="clip_range"):
        SimConfig(secure_agg=True, clip_range=-1.0)
    with pytest.raises(ConfigError, match="at least 2 clients"):
        SimConfig(num_clients=1, secure_agg=True)

    document = SimConfig(secure_agg=True, threat_model=ThreatModel.SEMI_HONEST).to_json()

    assert document["secure_agg"] is True
    assert document["threat_model"] == "semi-honest"
    assert SimConfig(num_clients=10, fraction_train=0.35).sampled_clients == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dp": DpMode.CENTRAL, "adaptive_clip": True}, "secure aggregation"),
        ({"dp": DpMode.LOCAL, "adaptive_clip": True}, "--dp central"),
        ({"client_epsilon": 1.0}, "needs a --dp"),
        ({"epsilon": 3.0}, "^--epsilon needs a --dp mechanism$"),
        ({"dp": DpMode.CENTRAL, "client_epsilon": 0.0}, "client_epsilon"),
        ({"client_lifetime_epsilon": 1.0}, "^--client-lifetime-epsilon needs a --dp mechanism$"),
        (
            {"dp": DpMode.CENTRAL, "client_lifetime_epsilon": 0.0},
            "^client_lifetime_epsilon must be > 0, got 0.0$",
        ),
        (
            {"dp": DpMode.CENTRAL, "client_lifetime_epsilon": float("inf")},
            "^client_lifetime_epsilon must be > 0, got inf$",
        ),
        ({"dp": DpMode.CENTRAL, "noise_multiplier": 0.0}, "noise_multiplier"),
        ({"dp": DpMode.DISTRIBUTED}, "--secure-agg"),
    ],
)
def test_dp_settings_that_cannot_work_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SimConfig(**kwargs)  # type: ignore[arg-type]


def test_each_dp_mode_builds_its_server_settings() -> None:
    assert SimConfig().server_dp() is None
    central = SimConfig(
        dp=DpMode.CENTRAL, secure_agg=True, adaptive_clip=True, secagg_dropout=0.0
    ).server_dp()
    assert central is not None and central.central is not None
    assert central.central.adaptive is not None and central.secure
    local = SimConfig(dp=DpMode.LOCAL, noise_multiplier=3.0).server_dp()
    assert local is not None and local.local is not None
    sample = SimConfig(dp=DpMode.SAMPLE, epsilon=3.0, num_rounds=4).server_dp()
    assert sample is not None and sample.sample is not None
    assert sample.sample.target_epsilon == 3.0 and sample.sample.total_epochs == 4
    fixed = SimConfig(dp=DpMode.SAMPLE, noise_multiplier=1.1).server_dp()
    assert fixed is not None and fixed.sample is not None
    assert fixed.sample.noise_multiplier == 1.1 and fixed.sample.target_epsilon == 0


def test_a_client_lifetime_cap_is_kept_and_serialised() -> None:
    config = SimConfig(dp=DpMode.CENTRAL, client_lifetime_epsilon=20.0)

    assert config.to_json()["client_lifetime_epsilon"] == 20.0
    assert SimConfig(dp=DpMode.CENTRAL).to_json()["client_lifetime_epsilon"] is None


def test_shared_noise_dp_sgd_needs_secure_aggregation_and_a_32_bit_ring() -> None:
    with pytest.raises(ConfigError, match="sample-distributed DP runs under secure aggregation"):
        SimConfig(num_clients=4, dp=DpMode.SAMPLE_DISTRIBUTED)
    with pytest.raises(ConfigError, match="needs a 32-bit ring"):
        SimConfig(num_clients=4, dp=DpMode.SAMPLE_DISTRIBUTED, secure_agg=True, ring_bits=16)
    with pytest.raises(ConfigError, match="dp_sample_rate"):
        SimConfig(num_clients=4, dp=DpMode.SAMPLE_DISTRIBUTED, secure_agg=True, dp_sample_rate=0)


def test_shared_noise_dp_sgd_is_sized_for_the_budget_and_the_policy_admits_exactly_it() -> None:
    config = SimConfig(
        num_clients=4,
        num_rounds=20,
        dp=DpMode.SAMPLE_DISTRIBUTED,
        secure_agg=True,
        secagg_dropout=0.0,
        epsilon=3.0,
        dp_sample_rate=0.1,
    )

    settings = config.secure_config(authority_public_key=bytes(32), examples_per_client=500)
    policy = config.device_policy(authority_public_key=bytes(32))

    assert settings.distributed_dp is not None
    assert settings.distributed_dp.noise_multiplier == config.shared_noise_multiplier
    assert policy.min_noise_multiplier == config.shared_noise_multiplier
    assert policy.min_honest_contributors == settings.min_honest_contributors(4)
    assert config.server_dp() is None  # the secure round carries it, not a DP wrapper
