"""Simulation at scale: a large population, a sample of it each round, SecAgg+ with distributed DP.

Both variants are a Flower 1.42 ``run_simulation`` of P simulated devices (SuperNodes)
of which M train each round (seeded sampling), on a D-parameter model whose local
training is trivial (add a constant), so the engine and the protocol dominate:

- ``flower_fedavg``: Message-API ``FedAvg``, no protection;
- ``fedge_secure_dp``: the same strategy through fedge's ``SecureAggregationGrid``
  and ``make_secagg_mod`` with distributed DP (clip to L2 1, rotate, round, discrete
  Gaussian noise sized for the fewest honest contributors), k and t chosen by fedge's
  own rule for M sampled devices tolerating 20 % dropouts, semi-honest server
  (which draws the graph: two full-fleet trips a round), a 16-bit ring;
- ``fedge_secure_dp_device_graph``: the same with holders each device draws itself
  (three trips: what the active model requires).

Round time is the time between successive central evaluations after one warm-up round
(Ray's start, the first imports and the nodes' registration are excluded). Peak RSS sums
this process and its descendants (Ray's workers), sampled every 200 ms. ``stage_seconds``
says where a secure round's time goes (the Grid's own timing of each SecAgg+ stage);
``engine_s`` is a round's time outside them.

Both run Flower's engine with fedge's :class:`simulations.linkstate.IndexedLinkState`,
as ``fedge sim run`` does; ``--linkstate flower`` runs Flower's own in-memory LinkState,
whose every poll scans every message in flight (O(population x messages) a poll), and
``--app-pickle flower`` lets Ray pickle the ClientApp for every message
(:mod:`simulations.app_pickle`). ``breakdown`` (see :mod:`benchmarks.secagg_round`)
splits the median round into the server's compute, each stage's exchange, the
clients' CPU and the bytes both ways.

Run: ``python -m benchmarks.scale --population 10000 --per-round 1000 --params 1000000``
(``--quick``: 1,000 devices, 100 a round, 100,000 parameters).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, machine, write
from benchmarks.secagg_round import _Counter, simulate
from simulations.offline import apply_offline_env

VARIANTS = ("flower_fedavg", "fedge_secure_dp", "fedge_secure_dp_device_graph")
_DELTA = np.float32(0.001)
_DROPOUT = 0.2


def _apps(  # noqa: PLR0917 - one benchmark's private helper
    variant: str, population: int, per_round: int, params: int, rounds: int, counter: _Counter
) -> tuple[Any, Any]:
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fl_client.policy import DevicePolicy
    from fl_client.secagg_mod import make_secagg_mod
    from fl_server.sampling import SeededSampling
    from fl_server.secagg import SecAggConfig, SecureAggregationGrid
    from secure_agg.params import ThreatModel, choose_neighbourhood
    from secure_agg.policy import ProtocolPolicy
    from strategies.ddp import DistributedDpSettings

    secure = variant.startswith("fedge_secure_dp")
    server_graph = variant == "fedge_secure_dp"
    config = SecAggConfig(
        clip_range=1.0,
        ring_bits=16,
        threat_model=ThreatModel.SEMI_HONEST,
        dropout_fraction=_DROPOUT,
        distributed_dp=DistributedDpSettings(l2_clip=1.0, noise_multiplier=1.0, ring_bits=16),
        prekeys=True,
        server_graph=server_graph,
    )
    chosen = choose_neighbourhood(
        per_round,
        dropout_fraction=_DROPOUT,
        corrupt_fraction=config.corrupt_fraction,
        threat_model=ThreatModel.SEMI_HONEST,
    )
    policy = DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=ThreatModel.SEMI_HONEST,
            ring_bits=frozenset({16}),
            min_degree=chosen.degree,
            min_survivors=per_round - int(_DROPOUT * per_round),
            accept_server_graph=server_graph,
        ),
        min_honest_contributors=config.min_honest_contributors(per_round),
    )
    timing = [counter.client_mod()]
    client = ClientApp(mods=timing + ([make_secagg_mod(policy=policy)] if secure else []))

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        del context
        arrays = msg.content.array_records["arrays"]
        local = ArrayRecord({key: Array(arrays[key].numpy() + _DELTA) for key in arrays})
        metrics = MetricRecord({"num-examples": 1})
        return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        del context
        counter.wrap(grid)
        used: Grid = grid
        if secure:
            used = SecureAggregationGrid(
                grid, config, on_round=lambda stats: counter.stages.append(stats.stage_seconds)
            )
        strategy = SeededSampling(
            FedAvg(
                fraction_train=per_round / population,
                fraction_evaluate=0.0,
                min_train_nodes=per_round,
                min_available_nodes=population,
            ),
            seed=0,
        )

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            del server_round, arrays
            counter.tick()
            return MetricRecord({})

        initial = ArrayRecord({"w": Array(np.zeros(params, dtype=np.float32))})
        strategy.start(
            grid=used, initial_arrays=initial, num_rounds=rounds, timeout=3600, evaluate_fn=evaluate
        )

    return server, client


def run_variant(
    variant: str,
    *,
    population: int,
    per_round: int,
    params: int,
    rounds: int,
    linkstate: str = "indexed",
    app_pickle: str = "once",
) -> dict[str, Any]:
    """Run one variant's simulation and return its JSON entry."""
    entry: dict[str, Any] = {
        "median_round_s": None,
        "min_round_s": None,
        "max_round_s": None,
        "peak_rss_mb": None,
        "upload_bytes_per_client": None,
        "error": None,
    }
    counter = _Counter()
    server, client = _apps(variant, population, per_round, params, rounds + 1, counter)
    return simulate(
        server,
        client,
        entry,
        counter,
        num_supernodes=population,
        per_round=per_round,
        rounds=rounds,
        linkstate=linkstate,
        app_pickle=app_pickle,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run both variants interleaved, print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=1_000)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="1,000 devices, 100 a round, 100k")
    parser.add_argument(
        "--linkstate",
        choices=("indexed", "flower"),
        default="indexed",
        help="Flower's in-memory LinkState as fedge runs it (indexed by device) or as shipped",
    )
    parser.add_argument(
        "--app-pickle",
        choices=("once", "flower"),
        default="once",
        help="the ClientApp pickled once (as fedge runs it) or for every message (as shipped)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.population, args.per_round, args.params = 1_000, 100, 100_000
    apply_offline_env()
    variants = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else list(reversed(variants)):
            print(f"[{repeat + 1}/{args.repeats}] {variant} ...", flush=True)
            entry = run_variant(
                variant,
                population=args.population,
                per_round=args.per_round,
                params=args.params,
                rounds=args.rounds,
                linkstate=args.linkstate,
                app_pickle=args.app_pickle,
            )
            print(f"    {entry}", flush=True)
            runs[variant].append(entry)
    results = {v: _merge(entries) for v, entries in runs.items()}
    fedavg = results.get("flower_fedavg", {}).get("median_round_s")
    secure = results.get("fedge_secure_dp", {}).get("median_round_s")
    device = results.get("fedge_secure_dp_device_graph", {}).get("median_round_s")
    document = {
        "benchmark": "scale",
        "args": {**vars(args), "out": None},
        "machine": machine(),
        "variants": results,
        "ratios": {
            "fedge_secure_dp_over_flower_fedavg": round(secure / fedavg, 3)
            if fedavg and secure
            else None,
            "fedge_secure_dp_device_graph_over_fedge_secure_dp": round(device / secure, 3)
            if device and secure
            else None,
        },
        "targets": {"round_time_ratio": 2.0, "peak_rss_mb": 8192},
    }
    write(args.out or RESULTS / "scale.json", document)
    print(document["ratios"])
    return document


def _merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
    good = [e for e in entries if e["error"] is None]
    if not good:
        return entries[0]
    merged = dict(good[-1])
    merged["median_round_s"] = statistics.median(e["median_round_s"] for e in good)
    merged["min_round_s"] = min(e["min_round_s"] for e in good)
    merged["max_round_s"] = max(e["max_round_s"] for e in good)
    merged["peak_rss_mb"] = max(e["peak_rss_mb"] for e in good)
    return merged


if __name__ == "__main__":
    main()
