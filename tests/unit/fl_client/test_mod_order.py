"""Fedge's device mods in the wrong order are refused when the ClientApp is built."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.errors import ConfigError
from fl_client.app import make_client_app
from fl_client.composition import device_mods
from fl_client.dp_mod import make_dp_mod
from fl_client.mod_order import ModRank, check_mod_order
from fl_client.norm_bound_mod import make_norm_bound_mod
from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy


def _provider(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((4, 28, 28), dtype=np.uint8), np.zeros(4, dtype=np.uint8)


def _policy() -> DevicePolicy:
    return DevicePolicy(protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST))


def test_the_composed_order_is_accepted_and_ranked() -> None:
    mods = device_mods(_policy(), secure=True, max_update_l2=1.0)

    check_mod_order(mods)
    make_client_app(_provider, mods=mods)
    assert [getattr(m, "__fedge_mod_rank__", None) for m in mods] == [
        ModRank.SECURE_AGGREGATION,
        ModRank.CLIENT_DP,
        ModRank.NORM_BOUND,
    ]


def test_a_reversed_order_is_refused_with_the_valid_order_named() -> None:
    policy = _policy()
    reversed_mods = [make_dp_mod(policy=policy), make_secagg_mod(policy=policy)]

    with pytest.raises(
        ConfigError,
        match="the secure aggregation mod comes after the client dp mod; the one valid order, "
        "outermost first, is secure aggregation, budget, client dp, norm bound",
    ):
        make_client_app(_provider, mods=reversed_mods)


def test_a_mod_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="the norm bound mod is given twice"):
        check_mod_order([make_norm_bound_mod(1.0), make_norm_bound_mod(2.0)])


def test_other_mods_may_sit_anywhere() -> None:
    def logging_mod(msg, context, call_next):  # type: ignore[no-untyped-def]
        return call_next(msg, context)

    check_mod_order([logging_mod, make_dp_mod(policy=_policy()), logging_mod])
