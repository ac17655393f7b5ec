"""The device's DP mod and privacy budget: clipping, local noise, declining past the budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from fedge.errors import StorageError
from fl_client.budget import (
    BUDGET_ERROR_CODE,
    ClientBudget,
    ClientLedger,
    ClientSpend,
    make_budget_mod,
    round_spend,
)
from fl_client.dp_mod import DP_ERROR_CODE, SECURE_MARKER_KEY, make_dp_mod, secure_marker
from fl_client.policy import DevicePolicy
from fl_client.refusals import RefusalLog
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import GaussianSteps, ddg_rho, gaussian_epsilon
from strategies.central import (
    CDP_RECORD_KEY,
    LDP_RECORD_KEY,
    UNCLIPPED_METRIC,
    CentralDpRound,
    LocalDpSettings,
)
from strategies.ddp import DDP_RECORD_KEY, DdpConfig
from strategies.rotation import rotated_length
from tests.helpers import delivered

STEP = 3.0  # every weight moves by this much in training: norm 3 * sqrt(4) = 6
# A device that accepts clips up to 20 and noise multipliers from 0.5.
POLICY = DevicePolicy(protocol=None, max_l2_clip=20.0, min_noise_multiplier=0.5)


def _message(records: dict[str, ConfigRecord]) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}),
            "config": ConfigRecord({"server-round": 4}),
            **records,
        }
    )
    return delivered(content)


def _context() -> Context:
    return Context(
        run_id=1, node_id=5, node_config={"partition-id": 2}, state=RecordDict(), run_config={}
    )


def _train(msg: Message, context: Context) -> Message:
    for key in (CDP_RECORD_KEY, LDP_RECORD_KEY, SECURE_MARKER_KEY):
        assert key not in msg.content, "the train handler sees no DP record"
    return _step(msg, context)


def _step(msg: Message, context: Context) -> Message:
    del context
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + np.float32(STEP))})
    metrics = MetricRecord({"num-examples": 50, "train-loss": 0.3})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def _weights(reply: Message) -> np.ndarray:
    arrays = reply.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    return arrays["w"].numpy()


def _metrics(reply: Message) -> MetricRecord:
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord)
    return metrics


def test_central_dp_clips_the_update_and_drops_per_client_metrics() -> None:
    central = CentralDpRound(l2_clip=1.5, noise_multiplier=1.0, adaptive=False)
    msg = _message({CDP_RECORD_KEY: ConfigRecord(dict(central.to_fields()))})
    reply = make_dp_mod(policy=POLICY)(msg, _context(), _train)
    assert not reply.has_error()
    weights = _weights(reply)
    assert np.isclose(np.linalg.norm(weights), 1.5, rtol=1e-6)
    assert np.allclose(weights, 0.75)  # the direction is kept
    assert dict(_metrics(reply)) == {"num-examples": 1}


def test_adaptive_clipping_bit_is_refused_outside_secure_aggregation() -> None:
    central = CentralDpRound(l2_clip=1.5, noise_multiplier=1.0, adaptive=True)
    msg = _message({CDP_RECORD_KEY: ConfigRecord(dict(central.to_fields()))})
    reply = make_dp_mod(policy=POLICY)(msg, _context(), _train)
    assert reply.has_error() and reply.error.code == DP_ERROR_CODE
    assert "in clear" in str(reply.error.reason)


@pytest.mark.parametrize(
    "forged",
    [
        ConfigRecord({"inside": True}),
        ConfigRecord({"secret": b"\x00" * 32}),
        ConfigRecord({"secret": b"\x00" * 32, "extra": 1}),
    ],
)
def test_a_server_cannot_forge_the_secure_round_marker(forged: ConfigRecord) -> None:
    # A hostile server writes the marker into a plain round to get the bit in clear.
    central = CentralDpRound(l2_clip=1.5, noise_multiplier=1.0, adaptive=True)
    msg = _message(
        {CDP_RECORD_KEY: ConfigRecord(dict(central.to_fields())), SECURE_MARKER_KEY: forged}
    )
    reply = make_dp_mod(policy=POLICY)(msg, _context(), _train)
    assert reply.has_error() and reply.error.code == DP_ERROR_CODE
    assert "in clear" in str(reply.error.reason)


@pytest.mark.parametrize(("clip", "bit"), [(1.5, 0.0), (10.0, 1.0)])
def test_adaptive_clipping_reports_the_bit_inside_a_secure_round(clip: float, bit: float) -> None:
    central = CentralDpRound(l2_clip=clip, noise_multiplier=1.0, adaptive=True)
    msg = _message(
        {
            CDP_RECORD_KEY: ConfigRecord(dict(central.to_fields())),
            SECURE_MARKER_KEY: secure_marker(),
        }
    )
    reply = make_dp_mod(policy=POLICY)(msg, _context(), _train)
    assert _metrics(reply)[UNCLIPPED_METRIC] == bit


def test_local_dp_sends_a_clipped_and_noised_update() -> None:
    local = LocalDpSettings(l2_clip=1.0, noise_multiplier=2.0)
    msg = _message({LDP_RECORD_KEY: ConfigRecord(dict(local.to_fields()))})
    first = _weights(
        make_dp_mod(policy=POLICY, rng_factory=lambda: DeterministicRandom(1))(
            msg, _context(), _train
        )
    )
    again = _weights(
        make_dp_mod(policy=POLICY, rng_factory=lambda: DeterministicRandom(1))(
            msg, _context(), _train
        )
    )
    other = _weights(
        make_dp_mod(policy=POLICY, rng_factory=lambda: DeterministicRandom(2))(
            msg, _context(), _train
        )
    )
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert not np.allclose(first, 0.5)  # noise was added to the clipped update (0.5 each)


def _must_not_train(msg: Message, context: Context) -> Message:
    raise AssertionError("trained despite a bad record")


def test_a_malformed_dp_record_is_refused_before_training() -> None:
    msg = _message({LDP_RECORD_KEY: ConfigRecord({"l2-clip": 1.0})})

    reply = make_dp_mod(policy=POLICY)(msg, _context(), _must_not_train)
    assert reply.has_error() and reply.error.code == DP_ERROR_CODE


def _central_msg(z: float = 2.0) -> Message:
    central = CentralDpRound(l2_clip=1.0, noise_multiplier=z, adaptive=False)
    return _message({CDP_RECORD_KEY: ConfigRecord(dict(central.to_fields()))})


def test_a_device_declines_the_round_that_would_exceed_its_budget(tmp_path: Path) -> None:
    one_round = gaussian_epsilon(
        [GaussianSteps(noise_multiplier=2.0, sample_rate=1.0, steps=1)], delta=1e-5
    )
    two_rounds = gaussian_epsilon(
        [GaussianSteps(noise_multiplier=2.0, sample_rate=1.0, steps=2)], delta=1e-5
    )
    budget = ClientBudget(directory=tmp_path, epsilon=(one_round + two_rounds) / 2, delta=1e-5)
    mod = make_budget_mod(budget, policy=POLICY)
    trained: list[int] = []

    def _count(msg: Message, context: Context) -> Message:
        trained.append(1)
        return _step(msg, context)

    first = mod(_central_msg(), _context(), _count)
    assert not first.has_error()
    second = mod(_central_msg(), _context(), _count)
    assert second.has_error() and second.error.code == BUDGET_ERROR_CODE
    assert "declining" in str(second.error.reason)
    assert len(trained) == 1  # declined before training
    ledger = budget.ledger_for(_context())
    assert [e["round"] for e in ledger.entries()] == [4]
    assert abs(ledger.epsilon(1e-5) - one_round) < 1e-9


def test_a_failed_training_costs_the_device_nothing(tmp_path: Path) -> None:
    budget = ClientBudget(directory=tmp_path, epsilon=100.0)

    def _fail(msg: Message, context: Context) -> Message:
        from flwr.app import Error

        return Message(Error(code=1, reason="out of memory"), reply_to=msg)

    assert make_budget_mod(budget, policy=POLICY)(_central_msg(), _context(), _fail).has_error()
    assert budget.ledger_for(_context()).entries() == []


def test_the_device_ledger_drops_a_torn_line_and_refuses_damage(tmp_path: Path) -> None:
    ledger = ClientLedger(tmp_path / "device.jsonl")
    spend = ClientSpend(
        mechanism="central-gaussian",
        gaussian=GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1),
    )
    ledger.record(1, spend)
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"round": 2, "mech')  # a crash while appending
    assert len(ledger.entries()) == 1
    ledger.record(3, spend)
    assert [e["round"] for e in ledger.entries()] == [1, 3]
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(StorageError, match="line 2 is damaged"):
        ledger.entries()


def test_a_device_charges_distributed_dp_for_its_fewest_honest_contributors() -> None:
    ddp = DdpConfig(
        l2_clip=1.0, noise_std=0.5, dimension=100, expected_clients=10, rotation_seed=bytes(32)
    )
    message = _message({DDP_RECORD_KEY: ConfigRecord(dict(ddp.to_fields()))})
    policy = DevicePolicy(protocol=None, min_noise_multiplier=0.5, min_honest_contributors=4)

    spend = round_spend(message.content, policy)

    # The noise of 4 honest clients, whatever the server expects to survive (10 here).
    assert spend is not None
    assert spend.rho == ddg_rho(
        l2_sensitivity=ddp.l2_sensitivity,
        l1_sensitivity=ddp.l1_sensitivity,
        sigma=ddp.sigma_integer,
        num_clients=4,
        dimension=rotated_length(100),
    )
    more = DevicePolicy(protocol=None, min_noise_multiplier=0.5, min_honest_contributors=8)
    assert spend.rho > round_spend(message.content, more).rho  # type: ignore[union-attr]
    assert round_spend(_message({}).content, policy) is None


@pytest.mark.parametrize(
    ("central", "match"),
    [
        (CentralDpRound(l2_clip=50.0, noise_multiplier=1.0, adaptive=False), "clip 50 exceeds"),
        (CentralDpRound(l2_clip=1.0, noise_multiplier=0.1, adaptive=False), "below the device"),
    ],
)
def test_rounds_outside_the_policy_are_refused_before_training_and_recorded(
    central: CentralDpRound, match: str, tmp_path: Path
) -> None:
    refusals = RefusalLog(tmp_path)
    msg = _message({CDP_RECORD_KEY: ConfigRecord(dict(central.to_fields()))})

    reply = make_dp_mod(policy=POLICY, on_refusal=refusals)(msg, _context(), _must_not_train)
    budget = ClientBudget(directory=tmp_path, epsilon=100.0)
    declined = make_budget_mod(budget, policy=POLICY)(msg, _context(), _must_not_train)

    assert reply.has_error() and reply.error.code == DP_ERROR_CODE
    assert declined.has_error() and declined.error.code == BUDGET_ERROR_CODE
    for error in (reply.error.reason, declined.error.reason):
        assert error is not None and match in error
    [entry] = refusals.entries(_context())
    assert entry["source"] == "differential privacy" and match in entry["reason"]
    assert budget.ledger_for(_context()).entries() == []


def test_ledger_lines_are_json_with_the_spend(tmp_path: Path) -> None:
    ledger = ClientLedger(tmp_path / "d.jsonl")
    ledger.record(2, ClientSpend(mechanism="distributed-ddg", rho=0.25))
    line = json.loads(ledger.path.read_text())
    assert line["round"] == 2 and line["rho"] == 0.25 and line["noise_multiplier"] is None


def test_a_device_ledger_spans_runs_and_restarts(tmp_path: Path) -> None:
    one_round = gaussian_epsilon(
        [GaussianSteps(noise_multiplier=2.0, sample_rate=1.0, steps=1)], delta=1e-5
    )
    two_rounds = gaussian_epsilon(
        [GaussianSteps(noise_multiplier=2.0, sample_rate=1.0, steps=2)], delta=1e-5
    )
    lifetime = DevicePolicy(protocol=None, lifetime_epsilon=(one_round + two_rounds) / 2)

    def run(run_id: int) -> Message:
        # A new run of the federation and a restarted device process: new objects, same
        # device directory and device id.
        budget = ClientBudget.for_policy(lifetime, tmp_path / "devices")
        context = Context(
            run_id=run_id,
            node_id=9000 + run_id,  # Flower draws new node ids every run
            node_config={"partition-id": 2},
            state=RecordDict(),
            run_config={},
        )
        return make_budget_mod(budget, policy=POLICY)(_central_msg(), context, _step)

    assert not run(1).has_error()
    second = run(2)

    assert second.has_error() and "declining" in (second.error.reason or "")
    entries = ClientLedger(tmp_path / "devices" / "device-2.jsonl").entries()
    assert len(entries) == 1
