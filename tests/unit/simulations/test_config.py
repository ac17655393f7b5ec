"""SimConfig: secure-aggregation settings are checked before anything starts."""

from __future__ import annotations

import pytest

from fedge.errors import ConfigError
from secure_agg.params import ThreatModel
from simulations.config import SimConfig


def test_a_federation_too_small_for_the_dropout_tolerance_fails_early_with_advice() -> None:
    with pytest.raises(ConfigError, match="pass --secagg-dropout 0"):
        SimConfig(num_clients=3, secure_agg=True)


def test_small_federations_run_without_dropout_tolerance() -> None:
    config = SimConfig(num_clients=3, secure_agg=True, secagg_dropout=0.0)

    secure = config.secure_config(authority_public_key=bytes(32))

    assert secure.dropout_fraction == 0.0
    assert secure.threat_model is ThreatModel.ACTIVE


def test_secure_settings_are_validated_and_serialised() -> None:
    with pytest.raises(ConfigError, match="clip_range"):
        SimConfig(secure_agg=True, clip_range=-1.0)
    with pytest.raises(ConfigError, match="at least 2 clients"):
        SimConfig(num_clients=1, secure_agg=True)

    document = SimConfig(secure_agg=True, threat_model=ThreatModel.SEMI_HONEST).to_json()

    assert document["secure_agg"] is True
    assert document["threat_model"] == "semi-honest"
    assert SimConfig(num_clients=10, fraction_train=0.35).sampled_clients == 3
