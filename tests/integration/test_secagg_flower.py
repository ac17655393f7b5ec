"""fedge SecAgg+ inside a real Flower simulation: 20 clients, dropouts at every stage.

The secure round's model must equal plaintext FedAvg (run through Flower too,
with the clients that dropped before sending their masked input failing) within
the quantisation bound, and the server must never receive a client's weights.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import RECORD_KEY, Stage
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import SystemRandomSource
from simulations.offline import quiet_flower, ray_backend_config
from strategies.ddp import DistributedDpSettings

pytestmark = pytest.mark.slow

NUM_CLIENTS = 20
SHAPES = {"conv": (4, 3, 5), "bias": (7,), "dense": (30, 20)}
CLIP = 0.5


@pytest.fixture(scope="module", autouse=True)
def one_ray_for_the_module() -> Iterator[None]:
    """Start Ray once for the module's seven simulations (each start and stop costs ~5 s).

    Flower's backend uses a Ray that is already running, and shuts it down after each
    simulation: that shutdown waits for the end of the module. Every simulation still
    gets its own engine, state and ClientApp actors.
    """
    import ray

    ray.init(**ray_backend_config(2, verbose=False)["init_args"])
    shutdown = ray.shutdown
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
            yield
    finally:
        shutdown()


def _policy(
    threat: ThreatModel = ThreatModel.SEMI_HONEST,
    authority: bytes | None = None,
    *,
    min_honest: int = 1,
) -> DevicePolicy:
    return DevicePolicy(
        protocol=ProtocolPolicy(threat_model=threat, authority_public_key=authority),
        min_honest_contributors=min_honest,
    )


def _update(partition: int) -> dict[str, np.ndarray]:
    # Test data, not secrets: numpy's generator is fine here.
    rng = np.random.default_rng(partition)
    return {k: rng.uniform(-0.4, 0.4, size=s).astype(np.float32) for k, s in SHAPES.items()}


def _weight(partition: int) -> int:
    return 10 + 7 * partition


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _train_app(*mods: Any) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        delta = _update(_partition(context))
        local = {k: Array(arrays[k].numpy() + delta[k]) for k in arrays}
        content = RecordDict(
            {
                "arrays": ArrayRecord(local),
                "metrics": MetricRecord(
                    {"num-examples": _weight(_partition(context)), "train-loss": 1.0}
                ),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _dropping_mod(drop_at: dict[int, Stage]) -> Callable[..., Message]:
    """Fail ``partition``'s reply at the given stage, as a device that crashed there."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        partition = _partition(context)
        record = msg.content.config_records.get(RECORD_KEY)
        stage = Stage(record["stage"]) if record is not None else Stage.SETUP
        if drop_at.get(partition) is stage:
            return Message(Error(code=1, reason="simulated dropout"), reply_to=msg)
        return call_next(msg, context)

    return mod


class _Identities:
    def __init__(self, identities: dict[int, NodeIdentity]) -> None:
        self.identities = identities

    def __call__(self, context: Context) -> NodeIdentity | None:
        return self.identities[_partition(context)]


def _simulate(
    client_app: ClientApp,
    *,
    secure: SecAggConfig | None,
    strategy: Callable[[], FedAvg] = lambda: FedAvg(
        fraction_evaluate=0.0, min_train_nodes=NUM_CLIENTS, min_available_nodes=NUM_CLIENTS
    ),
) -> tuple[dict[str, np.ndarray], list[SecAggRoundStats], list[Message]]:
    from flwr.simulation import run_simulation

    server = ServerApp()
    stats: list[SecAggRoundStats] = []
    seen: list[Message] = []
    out: dict[str, np.ndarray] = {}

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        del context
        used: Grid = SecureAggregationGrid(grid, secure, on_round=stats.append) if secure else grid
        original = grid.send_and_receive

        def recording(messages: Any, *, timeout: float | None = None) -> Any:
            replies = list(original(messages, timeout=timeout))
            seen.extend(replies)
            return replies

        grid.send_and_receive = recording  # type: ignore[method-assign]
        initial = ArrayRecord({k: Array(np.full(s, 0.25, np.float32)) for k, s in SHAPES.items()})
        result = strategy().start(grid=used, initial_arrays=initial, num_rounds=1, timeout=120)
        out.update({k: result.arrays[k].numpy() for k in result.arrays})

    quiet_flower(False)
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config=ray_backend_config(2, verbose=False),
    )
    assert out, "the ServerApp did not run"
    return out, stats, seen


def _expected(survivors: list[int]) -> dict[str, np.ndarray]:
    weights = np.array([_weight(p) for p in survivors], dtype=np.float64)
    return {
        k: 0.25
        + sum(w * _update(p)[k] for p, w in zip(survivors, weights, strict=True)) / weights.sum()
        for k in SHAPES
    }


@pytest.mark.parametrize("threat", list(ThreatModel))
def test_secure_fedavg_with_dropouts_at_every_stage_matches_plaintext_fedavg(
    threat: ThreatModel,
) -> None:
    # Random distinct partitions drop at each stage (different every run).
    stages = [Stage.SETUP, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK]
    if threat is ThreatModel.ACTIVE:
        stages.append(Stage.CONSISTENCY)
    order = list(range(NUM_CLIENTS))
    for i in range(len(order) - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    drop_at = dict(zip(order, stages, strict=False))
    lost = {
        p for p, s in drop_at.items() if s in (Stage.SETUP, Stage.SHARE_KEYS, Stage.MASKED_INPUT)
    }
    survivors = sorted(set(range(NUM_CLIENTS)) - lost)

    authority = EnrolmentAuthority.generate(SystemRandomSource())
    identities = _Identities(
        {p: authority.enrol(f"device-{p}", SystemRandomSource()) for p in range(NUM_CLIENTS)}
    )
    config = SecAggConfig(
        clip_range=CLIP,
        weight_cap=1000,
        threat_model=threat,
        dropout_fraction=len(stages) / NUM_CLIENTS,  # the dropouts this test injects
        authority_public_key=authority.public_key,
    )
    policy = _policy(threat, authority.public_key if threat is ThreatModel.ACTIVE else None)
    secure_app = _train_app(
        _dropping_mod(drop_at), make_secagg_mod(policy=policy, identities=identities)
    )
    secure, stats, seen = _simulate(secure_app, secure=config)
    plain_drop = {p: Stage.SETUP for p in lost}
    plain, _, _ = _simulate(_train_app(_dropping_mod(plain_drop)), secure=None)

    bound = EncodingConfig(clip_range=CLIP, max_clients=NUM_CLIENTS, weight_cap=1000).error_bound
    expected = _expected(survivors)
    for key in SHAPES:
        np.testing.assert_allclose(plain[key], expected[key], rtol=0, atol=1e-6)
        assert np.max(np.abs(secure[key] - plain[key])) <= bound + 1e-6
    [round_stats] = stats
    assert round_stats.survivors == len(survivors)
    assert round_stats.total_weight == sum(_weight(p) for p in survivors)
    assert len(round_stats.failures) == len(drop_at)
    # The server only ever received envelopes and masked integer vectors.
    for reply in seen:
        if reply.has_content():
            assert RECORD_KEY in reply.content.config_records
            assert all(
                np.dtype(a.dtype) == np.uint32
                for record in reply.content.array_records.values()
                for a in record.values()
            )
    upload = round_stats.upload_bytes_per_client
    model_bytes = 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    assert model_bytes < upload < model_bytes + 4096


def test_a_server_drawn_graph_round_with_dropouts_in_both_trips_matches_plaintext_fedavg() -> None:
    # Two full-fleet trips: keys, shares and masked input at once, then unmask. Three
    # devices drop in the first (one before it, at its pre-key), two at unmask.
    drop_at = {
        3: Stage.PREKEY,
        5: Stage.KEYED_MASKED_INPUT,
        11: Stage.KEYED_MASKED_INPUT,
        8: Stage.UNMASK,
        14: Stage.UNMASK,
    }
    survivors = sorted(set(range(NUM_CLIENTS)) - {3, 5, 11})
    config = SecAggConfig(
        clip_range=CLIP,
        weight_cap=1000,
        dropout_fraction=0.25,
        prekeys=True,
        server_graph=True,
    )
    policy = DevicePolicy(
        protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, accept_server_graph=True),
        min_honest_contributors=1,
    )
    app = _train_app(_dropping_mod(drop_at), make_secagg_mod(policy=policy))

    secure, stats, _ = _simulate(app, secure=config)

    [round_stats] = stats
    assert list(round_stats.stage_seconds) == ["prekey", "keyed-masked-input", "unmask"]
    assert round_stats.survivors == len(survivors)
    bound = EncodingConfig(clip_range=CLIP, max_clients=NUM_CLIENTS, weight_cap=1000).error_bound
    expected = _expected(survivors)
    for key in SHAPES:
        assert np.max(np.abs(secure[key] - expected[key])) <= bound + 1e-6


def test_server_optimisers_compose_with_the_secure_grid() -> None:
    config = SecAggConfig(clip_range=CLIP, weight_cap=1000)
    app = _train_app(make_secagg_mod(policy=_policy()))

    def fedadam() -> FedAvg:
        return FedAdam(
            fraction_evaluate=0.0,
            min_train_nodes=NUM_CLIENTS,
            min_available_nodes=NUM_CLIENTS,
            eta=0.1,
        )

    secure, stats, _ = _simulate(app, secure=config, strategy=fedadam)
    plain, _, _ = _simulate(_train_app(), secure=None, strategy=fedadam)

    assert stats[0].survivors == NUM_CLIENTS
    for key in SHAPES:
        # Adam normalises the step; quantisation noise moves it by far less than eta.
        np.testing.assert_allclose(secure[key], plain[key], atol=1e-3)


def _zero_update_app(*mods: Any) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        del context
        metrics = MetricRecord({"num-examples": 1})
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


def test_distributed_dp_with_dropouts_carries_the_configured_noise_and_no_more() -> None:
    # Three clients drop before their masked input, one while unmasking (four dropouts:
    # the round tolerates 20 %). Noise shares are sized for the 14 honest clients the
    # devices count on (16 expected survivors less 2 corrupt), each z c / sqrt(14); the
    # 17 that survive put z c sqrt(17/14) into the sum.
    drop_at = {3: Stage.SETUP, 8: Stage.SHARE_KEYS, 12: Stage.MASKED_INPUT, 17: Stage.UNMASK}
    settings = DistributedDpSettings(l2_clip=2.0, noise_multiplier=0.5)
    config = SecAggConfig(distributed_dp=settings, dropout_fraction=0.2)
    app = _zero_update_app(_dropping_mod(drop_at), make_secagg_mod(policy=_policy(min_honest=14)))

    result, [stats], _ = _simulate(app, secure=config)

    noise = np.concatenate([(result[k] - 0.25).ravel() for k in SHAPES]).astype(np.float64)
    summed = 0.5 * 2.0 * math.sqrt(17 / 14)
    assert stats.survivors == 17
    assert stats.dp is not None
    assert stats.dp["noise_std_of_sum"] == pytest.approx(summed)
    # The mean of 17 carries that over 17 per coordinate (667 coordinates: within 15 %).
    assert noise.std() == pytest.approx(summed / 17, rel=0.15)
