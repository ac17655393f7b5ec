"""A hostile server against distributed DP: the device charges and unmasks for its own worst case.

The server announces whatever it likes in the ``fedge.ddp`` record (an inflated count of
expected clients, a small noise) and sums as few clients as it likes. The devices (the
real secure-aggregation and budget mods, through Flower messages) charge their lifetime
ledger the rho of their policy's fewest honest contributors, refuse noise below their
policy, and refuse to unmask unless the survivors hold that many honest clients.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message

from fl_client.budget import ClientBudget, make_budget_mod
from fl_client.policy import DevicePolicy
from secure_agg.envelope import Stage
from secure_agg.identity import EnrolmentAuthority
from secure_agg.messages import (
    MaskedInputReport,
    UnmaskRequest,
)
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession
from strategies.accounting import ddg_rho
from strategies.ddp import DDP_RECORD_KEY, DdpConfig
from strategies.rotation import rotated_length
from tests.adversarial.hostile import (
    MODEL_SIZE,
    Fleet,
    decode,
    enrol,
    error_of,
    keys_agreed,
    model_content,
    train,
)

NODES = list(range(301, 313))  # twelve honest devices (no colluder needed here)
MIN_HONEST = 6
# 10 % of 12 participants may be corrupt: 2, so a device unmasks for >= 6 + 2 survivors.
REQUIRED = MIN_HONEST + 2
LENGTH = rotated_length(MODEL_SIZE)


def _fleet(tmp_path: Path) -> tuple[Fleet, ClientBudget, DevicePolicy]:
    authority = EnrolmentAuthority.generate(DeterministicRandom(3))
    policy = DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=ThreatModel.SEMI_HONEST, corrupt_fraction=0.1, min_survivors=2
        ),
        max_l2_clip=1.0,
        min_noise_multiplier=0.5,
        min_honest_contributors=MIN_HONEST,
    )
    budget = ClientBudget.for_policy(
        DevicePolicy(protocol=None, lifetime_epsilon=100.0), tmp_path / "devices"
    )
    return Fleet(NODES, policy, enrol(NODES, authority)), budget, policy


def _ddp(noise_multiplier: float, *, announced_clients: int) -> DdpConfig:
    # The server sizes (or claims to size) each share for `announced_clients` survivors.
    return DdpConfig(
        l2_clip=1.0,
        noise_std=noise_multiplier / math.sqrt(announced_clients),
        dimension=MODEL_SIZE,
        expected_clients=announced_clients,
        ring_bits=32,
        rotation_seed=bytes(32),
    )


def _round(
    fleet: Fleet, budget: ClientBudget, ddp: DdpConfig
) -> tuple[ServerSession, dict[int, Message]]:
    server, routed = keys_agreed(fleet, seed=5)
    base = model_content()
    fields: dict[str, ConfigRecordValues] = {**ddp.to_fields()}
    base[DDP_RECORD_KEY] = ConfigRecord(fields)
    budget_mod = make_budget_mod(budget, policy=fleet.policy)

    def charged_train(msg: Message, context: Context) -> Message:
        return budget_mod(msg, context, train)

    replies = {
        n: fleet.send(n, Stage.MASKED_INPUT, server.round_id, r, base=base, handler=charged_train)
        for n, r in routed.items()
    }
    return server, replies


def test_an_inflated_expected_count_does_not_lower_what_the_device_charges(tmp_path: Path) -> None:
    fleet, budget, policy = _fleet(tmp_path)
    # The server claims 100,000 expected clients: a share sized for that many is tiny, and
    # a device trusting the announcement would charge the rho of 100,000 clients' noise.
    ddp = _ddp(200.0, announced_clients=100_000)

    _, replies = _round(fleet, budget, ddp)

    assert all(not r.has_error() for r in replies.values())
    worst = ddg_rho(
        l2_sensitivity=ddp.l2_sensitivity,
        l1_sensitivity=ddp.l1_sensitivity,
        sigma=ddp.sigma_integer,
        num_clients=MIN_HONEST,
        dimension=LENGTH,
    )
    announced = ddg_rho(
        l2_sensitivity=ddp.l2_sensitivity,
        l1_sensitivity=ddp.l1_sensitivity,
        sigma=ddp.sigma_integer,
        num_clients=100_000,
        dimension=LENGTH,
    )
    for node in NODES:
        [entry] = budget.ledger_for(fleet.contexts[node]).entries()
        assert entry["rho"] == pytest.approx(worst) == policy.distributed_rho(ddp)
        assert entry["rho"] > 1000 * announced


def test_noise_below_the_policy_is_refused_before_training(tmp_path: Path) -> None:
    fleet, budget, _ = _fleet(tmp_path)
    # Sized so that 12 clients give multiplier 0.9, but the 6 honest ones the device
    # counts on give 0.9 sqrt(6 / 12) = 0.64 ... and 0.3 gives 0.21 < the policy's 0.5.
    ddp = _ddp(0.3, announced_clients=12)

    _, replies = _round(fleet, budget, ddp)

    for node, reply in replies.items():
        assert "below the device policy's 0.5" in error_of(reply)
        assert budget.ledger_for(fleet.contexts[node]).entries() == []
        assert not fleet.holds_state(node)


@pytest.mark.parametrize("survivors", [3, REQUIRED - 1])
def test_a_sum_without_the_fewest_honest_contributors_is_never_unmasked(
    tmp_path: Path, survivors: int
) -> None:
    fleet, budget, _ = _fleet(tmp_path)
    server, replies = _round(fleet, budget, _ddp(2.0, announced_clients=MIN_HONEST))
    masked = {n: decode(r, MaskedInputReport) for n, r in replies.items()}
    assert len(masked) == len(NODES)
    few = tuple(NODES[:survivors])

    for node in few:
        reply = fleet.send(node, Stage.UNMASK, server.round_id, UnmaskRequest(few, {}))
        assert f"{survivors} survivors; the device unmasks only for at least {REQUIRED}" in (
            error_of(reply)
        )
        assert not fleet.holds_state(node)


def test_a_sum_with_enough_survivors_is_unmasked(tmp_path: Path) -> None:
    fleet, budget, _ = _fleet(tmp_path)
    server, _ = _round(fleet, budget, _ddp(2.0, announced_clients=MIN_HONEST))
    enough = tuple(NODES[:REQUIRED])

    answers = [
        fleet.send(n, Stage.UNMASK, server.round_id, UnmaskRequest(enough, {})) for n in enough
    ]

    # Some may still refuse for their own holders (a sum of 8 of 12 can leave a device
    # with fewer than t surviving holders), but the survivor count is no longer the reason.
    assert any(not a.has_error() for a in answers)
    assert all(
        "survivors; the device unmasks" not in (a.error.reason or "")
        for a in answers
        if a.has_error()
    )
