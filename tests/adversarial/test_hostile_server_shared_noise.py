"""A hostile server against shared-noise DP-SGD: the device charges its own worst case.

The server writes whatever it likes into the ``fedge.sddp`` record: shares sized for
more honest devices than the device's policy counts on, a noise below the policy, a
clip above it, or the record in a plain (not secure) train message where the
device's clipped gradient sum would travel in clear. The real secure-aggregation,
budget and client-app code answers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from edge_runtime.models import ModelName, build_model
from fl_client.app import make_client_app
from fl_client.budget import ClientBudget, make_budget_mod
from fl_client.grad_sum import GRADIENT_SUM_KEY, gradient_sum_record
from fl_client.policy import DevicePolicy
from secure_agg.envelope import Stage
from secure_agg.identity import EnrolmentAuthority
from secure_agg.messages import MaskedInputReport
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from strategies.ddp import DDP_RECORD_KEY
from strategies.rotation import rotated_length
from strategies.sample_ddp import SDDP_RECORD_KEY, SampleDdpConfig, SampleDdpSettings
from tests.adversarial.hostile import (
    MODEL_SIZE,
    Fleet,
    decode,
    enrol,
    error_of,
    keys_agreed,
    model_content,
)
from tests.helpers import delivered

NODES = list(range(401, 413))
MIN_HONEST = 6
LENGTH = rotated_length(MODEL_SIZE)


def _fleet(tmp_path: Path) -> tuple[Fleet, ClientBudget, DevicePolicy]:
    authority = EnrolmentAuthority.generate(DeterministicRandom(4))
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


def _sddp(multiplier: float, *, sized_for: int, clip: float = 1.0) -> SampleDdpConfig:
    # The server sizes (or claims to size) each share so `sized_for` devices give `multiplier`.
    settings = SampleDdpSettings(
        example_clip=clip,
        noise_multiplier=multiplier,
        sample_rate=0.1,
        learning_rate=1.0,
        expected_batch=10.0,
    )
    return settings.for_round(
        dimension=MODEL_SIZE, sampled=sized_for, min_honest=sized_for, rotation_seed=bytes(32)
    )


def _gradient_step(msg: Message, context: Context) -> Message:
    """A device's clipped gradient sum (what the client app's train handler returns)."""
    del context
    content = RecordDict(
        {
            GRADIENT_SUM_KEY: gradient_sum_record(np.full(MODEL_SIZE, 0.5)),
            "metrics": MetricRecord({"dp-sample-rate": 0.1}),
        }
    )
    return Message(content=content, reply_to=msg)


def _masked_input(
    fleet: Fleet, budget: ClientBudget, records: dict[str, SampleDdpConfig]
) -> dict[int, Message]:
    server, routed = keys_agreed(fleet, seed=6)
    base = model_content()
    for key, config in records.items():
        fields: dict[str, ConfigRecordValues] = {**config.to_fields()}
        base[key] = ConfigRecord(fields)
    budget_mod = make_budget_mod(budget, policy=fleet.policy)

    def charged(msg: Message, context: Context) -> Message:
        return budget_mod(msg, context, _gradient_step)

    return {
        n: fleet.send(n, Stage.MASKED_INPUT, server.round_id, r, base=base, handler=charged)
        for n, r in routed.items()
    }


def test_shares_sized_for_many_devices_are_charged_for_the_policys_fewest(
    tmp_path: Path,
) -> None:
    fleet, budget, policy = _fleet(tmp_path)
    # The server claims 100,000 honest devices share the noise: each share is tiny, and a
    # device trusting that would record multiplier 200 (almost nothing spent).
    sddp = _sddp(200.0, sized_for=100_000)

    replies = _masked_input(fleet, budget, {SDDP_RECORD_KEY: sddp})

    assert all(
        isinstance(decode(r, MaskedInputReport), MaskedInputReport) for r in replies.values()
    )
    worst = sddp.multiplier(MIN_HONEST)
    assert worst == pytest.approx(200.0 * math.sqrt(MIN_HONEST / 100_000), rel=1e-3)
    for node in NODES:
        [entry] = budget.ledger_for(fleet.contexts[node]).entries()
        assert entry["mechanism"] == "sample-ddg"
        assert entry["noise_multiplier"] == pytest.approx(worst)
        assert entry["noise_multiplier"] == policy.sample_distributed_multiplier(sddp)
        assert entry["sample_rate"] == 0.1


def test_noise_below_the_policy_is_refused_before_the_gradients_are_computed(
    tmp_path: Path,
) -> None:
    fleet, budget, _ = _fleet(tmp_path)
    # 12 devices would give 0.6; the 6 honest ones the device counts on give 0.42 < 0.5.
    sddp = _sddp(0.6, sized_for=12)

    replies = _masked_input(fleet, budget, {SDDP_RECORD_KEY: sddp})

    for node, reply in replies.items():
        assert "below the device policy's 0.5" in error_of(reply)
        assert budget.ledger_for(fleet.contexts[node]).entries() == []
        assert not fleet.holds_state(node)


def test_an_example_clip_above_the_policy_is_refused(tmp_path: Path) -> None:
    fleet, budget, _ = _fleet(tmp_path)

    replies = _masked_input(fleet, budget, {SDDP_RECORD_KEY: _sddp(4.0, sized_for=6, clip=5.0)})

    for node, reply in replies.items():
        assert "clip 5 exceeds the device policy's 1" in error_of(reply)
        assert budget.ledger_for(fleet.contexts[node]).entries() == []


def test_two_distributed_mechanisms_in_one_round_are_refused(tmp_path: Path) -> None:
    fleet, budget, _ = _fleet(tmp_path)
    sddp = _sddp(4.0, sized_for=6)

    # The same ring under the user-level record too: which noise would the device add?
    replies = _masked_input(fleet, budget, {SDDP_RECORD_KEY: sddp, DDP_RECORD_KEY: sddp.ring})  # type: ignore[dict-item]

    for reply in replies.values():
        assert "two distributed-DP mechanisms" in error_of(reply)


def test_the_gradient_sum_never_leaves_outside_a_secure_round() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(40, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=40)
    policy = DevicePolicy(
        protocol=None, max_l2_clip=1.0, min_noise_multiplier=0.5, min_honest_contributors=1
    )
    app = make_client_app(_Examples(images, labels), model=ModelName.CNN, policy=policy)
    weights = ArrayRecord(build_model(ModelName.CNN, seed=0).state_dict())
    dimension = sum(int(np.prod(weights[k].shape)) for k in weights)
    config = SampleDdpSettings(
        example_clip=1.0,
        noise_multiplier=2.0,
        sample_rate=0.5,
        learning_rate=1.0,
        expected_batch=20.0,
    ).for_round(dimension=dimension, sampled=4, min_honest=1, rotation_seed=bytes(32))
    fields: dict[str, ConfigRecordValues] = {**config.to_fields()}
    message = delivered(
        RecordDict(
            {
                "arrays": weights,
                "config": ConfigRecord({"server-round": 1, "batch-size": 8}),
                SDDP_RECORD_KEY: ConfigRecord(fields),
            }
        )
    )
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config={},
    )

    # A plain train message (no secure-aggregation mod in front): the server would read
    # the clipped gradient sum itself, without any noise.
    reply = app(message, context)

    assert reply.has_error()
    assert "outside a secure round" in (reply.error.reason or "")


class _Examples:
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __call__(self, partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images, self.labels
