"""The noise really released is the noise the ledgers charge for (measured over many draws).

- Adaptive clipping: one client moves the released count by exactly 1/2 (centred bits,
  through a real secure round), the count carries N(0, sigma_b^2) and the update
  N(0, (z_u B)^2), so together they are the Gaussian mechanism of multiplier z the
  ledger records (Andrew et al. 2021, Thm 1).
- Distributed DP: the sum of the policy's fewest honest contributors carries h sigma^2
  of integer noise per coordinate, the variance the device's charged rho assumes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fl_client.policy import DevicePolicy
from fl_server.secagg import SecAggConfig, SecureAggregationGrid
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import ddg_rho
from strategies.central import (
    CENTRED_BITS_METRIC,
    SENSITIVITY_METRIC,
    AdaptiveClipping,
    CentralDpRound,
    CentralDpSettings,
    add_central_noise,
    next_clip,
)
from strategies.ddp import DdpConfig, ddp_encode
from strategies.rotation import rotated_length
from tests.unit.fl_server.test_privacy import _big_step, _with_mods
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    InProcessGrid,
    _server_identity,
)

DRAWS = 40_000
# The standard error of a sample standard deviation is sigma / sqrt(2 n): 0.35 % here.
TOLERANCE = 0.02


def _released(num_clients: int, step: float) -> dict[str, float]:
    """Run a real secure central-DP round with adaptive clipping; return the aggregate metrics."""
    nodes = list(range(401, 401 + num_clients))
    apps = {n: _with_mods(_big_step(8, step), secure=True) for n in nodes}
    grid = SecureAggregationGrid(
        InProcessGrid(apps), SecAggConfig(degree=num_clients - 1, threshold=num_clients - 1)
    )
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=num_clients)
    central = CentralDpRound(l2_clip=1.0, noise_multiplier=1.0, adaptive=True)
    config = ConfigRecord()
    messages = list(
        strategy.configure_train(
            1, ArrayRecord({"w": Array(np.zeros(8, np.float32))}), config, grid
        )
    )
    for message in messages:
        message.content["fedge.cdp"] = ConfigRecord(dict(central.to_fields()))
    [aggregate] = [r for r in grid.send_and_receive(messages) if not r.has_error()]
    metrics = next(iter(aggregate.content.metric_records.values()))
    return {key: float(value) for key, value in metrics.items()}  # type: ignore[arg-type]


@pytest.mark.parametrize("step", [0.01, 5.0])  # every update inside the clip / every one clipped
def test_one_client_moves_the_released_count_by_exactly_one_half(step: float) -> None:
    with_client = _released(6, step)
    without_client = _released(5, step)

    # Centred bits b - 1/2: the sum of 6 is +-3, of 5 is +-2.5, whatever the bits are.
    sign = 1.0 if step < 1.0 else -1.0
    assert with_client[CENTRED_BITS_METRIC] == pytest.approx(sign * 3.0, abs=1e-6)
    assert without_client[CENTRED_BITS_METRIC] == pytest.approx(sign * 2.5, abs=1e-6)
    assert abs(with_client[CENTRED_BITS_METRIC] - without_client[CENTRED_BITS_METRIC]) == (
        pytest.approx(0.5, abs=1e-6)
    )
    # The sensitivity the update noise is sized for: conditional rounding's bound, >= C.
    assert 1.0 <= with_client[SENSITIVITY_METRIC] < 1.0 + 1e-6


def test_the_released_count_and_update_carry_the_noise_of_multiplier_z() -> None:
    z, sigma_b, expected_clients = 1.0, 1.0, 10  # the example
    settings = CentralDpSettings(
        l2_clip=1.0, noise_multiplier=z, adaptive=AdaptiveClipping(count_noise_std=sigma_b)
    )
    assert settings.adaptive is not None
    rng = DeterministicRandom(17)
    # The count: (centred sum + N(0, sigma_b^2)) / n + 1/2, drawn DRAWS times.
    fractions = np.array(
        [
            next_clip(
                1.0,
                centred_sum=0.0,
                expected_clients=expected_clients,
                adaptive=settings.adaptive,
                rng=rng,
            )[1]
            for _ in range(DRAWS)
        ]
    )
    count_noise = (fractions - 0.5) * expected_clients
    # The update: the sum's noise per coordinate, z_u times the sensitivity.
    update_noise = add_central_noise(
        np.zeros(DRAWS),
        l2_clip=1.0,
        noise_multiplier=settings.update_noise_multiplier,
        num_clients=1,
        rng=rng,
    )

    measured_count = float(count_noise.std())
    measured_update = float(update_noise.std())
    assert measured_count == pytest.approx(sigma_b, rel=TOLERANCE)
    assert measured_update == pytest.approx(settings.update_noise_multiplier, rel=TOLERANCE)
    # Sensitivities 1/2 (centred count) and 1 (clipped update): composed multiplier.
    composed = (measured_update**-2 + (measured_count / 0.5) ** -2) ** -0.5
    assert composed == pytest.approx(z, rel=TOLERANCE)
    # With raw bits (sensitivity 1) the same noise would only give 0.756 < z = 1.
    raw = (measured_update**-2 + measured_count**-2) ** -0.5
    assert raw == pytest.approx(0.756, rel=TOLERANCE)


@pytest.mark.parametrize("min_honest", [3, 8])
def test_the_sum_of_the_fewest_honest_contributors_carries_the_charged_noise(
    min_honest: int,
) -> None:
    dimension = 4096
    config = DdpConfig(
        l2_clip=1.0,
        noise_std=2.0 / math.sqrt(min_honest),  # z = 2 over the fewest honest clients
        dimension=dimension,
        expected_clients=20,
        ring_bits=32,
        rotation_seed=bytes(32),
    )
    policy = DevicePolicy(
        protocol=None, min_noise_multiplier=2.0, min_honest_contributors=min_honest
    )
    policy.check_distributed(config)
    rounds = 10
    totals = []
    for round_index in range(rounds):
        total = np.zeros(rotated_length(dimension), dtype=np.uint32)
        for client in range(min_honest):
            # Zero updates: what reaches the sum is the rounding (0 here) and the noise.
            rng = DeterministicRandom(1000 * round_index + client)
            total += ddp_encode(np.zeros(dimension), config, rng)
        totals.append(total.view(np.int32).astype(np.float64))  # two's complement
    noise = np.concatenate(totals)

    measured_sigma = float(noise.std()) / math.sqrt(min_honest)
    assert measured_sigma == pytest.approx(config.sigma_integer, rel=TOLERANCE)
    charged = policy.distributed_rho(config)
    implied = ddg_rho(
        l2_sensitivity=config.l2_sensitivity,
        l1_sensitivity=config.l1_sensitivity,
        sigma=measured_sigma,
        num_clients=min_honest,
        dimension=rotated_length(dimension),
    )
    assert implied == pytest.approx(charged, rel=3 * TOLERANCE)
    # About 1 / (2 z^2) = 0.125: the noise of exactly min_honest clients at z = 2.
    assert charged == pytest.approx(0.125, rel=0.05)
