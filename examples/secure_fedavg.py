"""Secure aggregation in your own Flower app: wrap the Grid, add the mod. Runnable.

    .venv/bin/python examples/secure_fedavg.py

Ten simulated clients each add a private vector to a 1,000-parameter model;
Flower's FedAvg (any ``flwr.serverapp.strategy`` works: FedProx, FedAdam, ...)
runs three rounds, and fedge's SecAgg+ makes sure the server only ever sees
the sum of the ten updates. The script prints the aggregate's error against
the plaintext mean (within the quantisation bound) and each round's protocol
statistics.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from secure_agg import ProtocolPolicy, ThreatModel
from simulations.offline import apply_offline_env, quiet_flower, ray_backend_config

NUM_CLIENTS = 10
SIZE = 1_000


def private_update(partition: int) -> np.ndarray:
    """Each client's secret contribution (fixed here so the script can check the result)."""
    return np.linspace(-0.2, 0.2, SIZE, dtype=np.float32) * (partition - 4.5) / 4.5


# --- the client: an ordinary train handler, plus fedge's mod -----------------------
# The device's own policy, fixed on the device: a semi-honest server, 10 % of the
# clients assumed to collude with it (the threshold rule), at least 8 in every sum.
policy = DevicePolicy(
    protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, min_survivors=8)
)
client_app = ClientApp(mods=[make_secagg_mod(policy=policy)])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the 'trained' model and the example count; the mod masks the update."""
    partition = int(context.node_config["partition-id"])
    arrays = msg.content.array_records["arrays"]
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + private_update(partition))})
    metrics = MetricRecord({"num-examples": 100})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


# --- the server: any Message-API strategy, on the secure Grid ----------------------
server_app = ServerApp()
rounds: list[SecAggRoundStats] = []


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run three FedAvg rounds, each one a SecAgg+ round."""
    del context
    secure = SecureAggregationGrid(grid, SecAggConfig(clip_range=0.25), on_round=rounds.append)
    strategy = FedAvg(
        fraction_evaluate=0.0, min_train_nodes=NUM_CLIENTS, min_available_nodes=NUM_CLIENTS
    )
    initial = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    result = strategy.start(grid=secure, initial_arrays=initial, num_rounds=3)
    plain_mean = np.mean([private_update(p) for p in range(NUM_CLIENTS)], axis=0)
    error = np.max(np.abs(result.arrays["w"].numpy() - 3 * plain_mean))
    print(f"max |secure - plaintext| after 3 rounds: {error:.2e}")


if __name__ == "__main__":
    apply_offline_env()
    quiet_flower(False)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config=ray_backend_config(2, verbose=False),
    )
    for stats in rounds:
        print(
            f"round {stats.server_round}: {stats.survivors}/{stats.sampled} clients summed, "
            f"k={stats.degree} t={stats.threshold}, {stats.ring_bits}-bit ring, "
            f"{stats.upload_bytes_per_client / 1e3:.1f} kB uploaded per client"
        )
