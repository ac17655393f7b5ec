"""Cost of a secure round in a real Flower simulation: fedge SecAgg+ vs Flower's, vs plain FedAvg.

Every variant is a Flower 1.42 ``run_simulation`` of N clients whose training is
trivial (add a constant to the D-parameter model), so the protocol dominates:

- ``flower_fedavg``: Message-API ``FedAvg``, no protection;
- ``flower_secaggplus``: Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod`` on its
  legacy strategy path (``SecAggWorkflow`` + ``secagg_mod`` with ``--classic``);
- ``fedge_secaggplus``: Message-API ``FedAvg`` through fedge's ``SecureAggregationGrid``
  and ``make_secagg_mod`` (semi-honest server, 32-bit ring);
- ``fedge_secaggplus_ddp``: the same with distributed DP (each client clips to L2 1,
  rotates, rounds and adds discrete Gaussian noise of multiplier 1 before masking).

Round time is the time between the strategy's successive central evaluations,
after one warm-up round (Ray's start-up and first imports are excluded);
upload bytes are counted on the Grid for every reply;
peak RSS sums this process and its descendants (Ray's workers), sampled every 50 ms.
Variants run interleaved across ``--repeats``.

Run: ``python -m benchmarks.secagg_round --clients 100 --params 1000000 --rounds 3 --k 8``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, machine, write
from fl_server.secagg import payload_bytes
from simulations.offline import apply_offline_env, quiet_flower, ray_backend_config

VARIANTS = ("flower_fedavg", "flower_secaggplus", "fedge_secaggplus", "fedge_secaggplus_ddp")
_DELTA = np.float32(0.001)


def _tree_rss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(
                line.split(":", 1)
                for line in (entry / "status").read_text().splitlines()
                if ":" in line
            )
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class _PeakRss:
    def __init__(self) -> None:
        import os

        self._root = os.getpid()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _tree_rss_bytes(self._root))

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Counter:
    """Counts the bytes of every reply that passes through a Grid."""

    def __init__(self) -> None:
        self.upload = 0
        self.times: list[float] = []
        self.stages: list[dict[str, float]] = []

    def wrap(self, grid: Any) -> None:
        original = grid.send_and_receive

        def counting(messages: Iterable[Any], *, timeout: float | None = None) -> Any:
            replies = list(original(messages, timeout=timeout))
            self.upload += sum(payload_bytes(r.content) for r in replies if r.has_content())
            return replies

        grid.send_and_receive = counting

    def tick(self) -> None:
        self.times.append(time.perf_counter())


def _message_api_apps(  # noqa: PLR0917 - one benchmark's private helper
    variant: str,
    clients: int,
    params: int,
    rounds: int,
    k: int,
    t: int,
    counter: _Counter,
    ring_bits: int = 32,
) -> tuple[Any, Any]:
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fl_client.policy import DevicePolicy
    from fl_client.secagg_mod import make_secagg_mod
    from fl_server.secagg import SecAggConfig, SecureAggregationGrid
    from secure_agg.params import ThreatModel
    from secure_agg.policy import ProtocolPolicy
    from strategies.ddp import DistributedDpSettings

    secure = variant in ("fedge_secaggplus", "fedge_secaggplus_ddp")
    ddp = (
        DistributedDpSettings(l2_clip=1.0, noise_multiplier=1.0, ring_bits=ring_bits)
        if variant == "fedge_secaggplus_ddp"
        else None
    )
    config = SecAggConfig(
        clip_range=0.01,
        weight_cap=1,
        degree=k,
        threshold=t,
        ring_bits=ring_bits,
        distributed_dp=ddp,
    )
    # The devices accept the k and t compared with Flower's (no corrupt client assumed:
    # this benchmark measures cost at equal k, not the threshold rule).
    policy = DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=ThreatModel.SEMI_HONEST, corrupt_fraction=0.0, min_degree=1
        ),
        min_honest_contributors=config.min_honest_contributors(clients),
    )
    client = ClientApp(mods=[make_secagg_mod(policy=policy)] if secure else [])

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
        strategy = FedAvg(
            fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
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


def _flower_secagg_apps(  # noqa: PLR0917 - one benchmark's private helper
    clients: int, params: int, rounds: int, k: int, t: int, counter: _Counter, *, classic: bool
) -> tuple[Any, Any]:
    from flwr.client import NumPyClient
    from flwr.client.mod import secagg_mod, secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow, SecAggWorkflow

    class _Trivial(NumPyClient):
        def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[Any, int, dict]:  # type: ignore[type-arg]
            return [p + _DELTA for p in parameters], 1, {}

    client = ClientApp(
        client_fn=lambda context: _Trivial().to_client(),
        mods=[secagg_mod if classic else secaggplus_mod],
    )
    server = ServerApp()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        counter.wrap(grid)

        def evaluate(server_round: int, ndarrays: Any, config: Any) -> None:
            del server_round, ndarrays, config
            counter.tick()

        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
            evaluate_fn=evaluate,
            initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        fit = (
            SecAggWorkflow(reconstruction_threshold=t)
            if classic
            else SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=t)
        )
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    return server, client


def run_variant(
    variant: str,
    *,
    clients: int,
    params: int,
    rounds: int,
    k: int,
    t: int,
    classic: bool,
    ring_bits: int = 32,
) -> dict[str, Any]:
    """Run one variant's simulation and return its JSON entry."""
    entry: dict[str, Any] = {
        "median_round_s": None,
        "min_round_s": None,
        "max_round_s": None,
        "upload_bytes_per_client": None,
        "peak_rss_mb": None,
        "error": None,
    }
    counter = _Counter()
    # One extra round first: Ray starts its actors and imports everything in it.
    total_rounds = rounds + 1
    if variant == "flower_secaggplus":
        server, client = _flower_secagg_apps(
            clients, params, total_rounds, k, t, counter, classic=classic
        )
    else:
        server, client = _message_api_apps(
            variant, clients, params, total_rounds, k, t, counter, ring_bits
        )
    return simulate(
        server, client, entry, counter, num_supernodes=clients, per_round=clients, rounds=rounds
    )


def simulate(
    server: Any,
    client: Any,
    entry: dict[str, Any],
    counter: _Counter,
    *,
    num_supernodes: int,
    per_round: int,
    rounds: int,
    linkstate: str = "indexed",
) -> dict[str, Any]:
    """Run one simulation (a warm-up round, then ``rounds``) and fill in ``entry``'s timings.

    ``linkstate``: ``"indexed"`` (fedge's :class:`simulations.linkstate.IndexedLinkState`,
    what ``fedge sim run`` uses) or ``"flower"`` (Flower's own in-memory LinkState).
    """
    from flwr.simulation import run_simulation

    from simulations.linkstate import indexed_linkstate

    quiet_flower(False)
    installed = indexed_linkstate() if linkstate == "indexed" else contextlib.nullcontext()
    try:
        with _PeakRss() as rss, installed:
            run_simulation(
                server_app=server,
                client_app=client,
                num_supernodes=num_supernodes,
                backend_config=ray_backend_config(_cores(), verbose=False),
            )
    except Exception as exc:  # a benchmark reports, never hides, a failure
        entry["error"] = f"{type(exc).__name__}: {exc}"
        return entry
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    laps = [b - a for a, b in zip(counter.times, counter.times[1:], strict=False)][1:]
    if len(laps) != rounds:
        entry["error"] = f"{len(laps)} of {rounds} rounds completed"
        return entry
    entry.update(
        median_round_s=round(statistics.median(laps), 4),
        min_round_s=round(min(laps), 4),
        max_round_s=round(max(laps), 4),
        upload_bytes_per_client=round(counter.upload / (per_round * (rounds + 1))),
        peak_rss_mb=round(rss.peak / 2**20, 1),
    )
    if counter.stages:
        stages = {k: round(v, 4) for k, v in counter.stages[-1].items()}
        entry["stage_seconds"] = stages
        entry["engine_s"] = round(laps[-1] - sum(stages.values()), 4)
    return entry


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run every variant interleaved, print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=8, help="neighbours per client (even)")
    parser.add_argument("--t", type=int, default=None, help="threshold [default: k/2 + 1]")
    parser.add_argument(
        "--classic", action="store_true", help="k = n - 1; Flower's SecAggWorkflow + secagg_mod"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--ring-bits", type=int, default=32, help="fedge's ring width")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    apply_offline_env()
    k = args.clients - 1 if args.classic else args.k
    t = args.t or (math.ceil(args.clients / 2) + 1 if args.classic else k // 2 + 1)
    variants = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else list(reversed(variants)):
            print(f"[{repeat + 1}/{args.repeats}] {variant} ...", flush=True)
            entry = run_variant(
                variant,
                clients=args.clients,
                params=args.params,
                rounds=args.rounds,
                k=k,
                t=t,
                classic=args.classic,
                ring_bits=args.ring_bits,
            )
            print(f"    {entry}", flush=True)
            runs[variant].append(entry)
    results = {v: _merge(entries) for v, entries in runs.items()}
    document = {
        "benchmark": "secagg_round",
        "args": {**vars(args), "k": k, "t": t, "out": None},
        "machine": machine(),
        "variants": results,
        "ratios": _ratios(results),
    }
    suffix = ("-classic" if args.classic else "") + (
        f"-ring{args.ring_bits}" if args.ring_bits != 32 else ""
    )
    name = f"secagg_round-{args.clients}x{args.params}{suffix}.json"
    write(args.out or RESULTS / name, document)
    print(document["ratios"])
    return document


def _merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
    good = [e for e in entries if e["error"] is None]
    if not good:
        return entries[0]
    pick: Callable[[str], list[float]] = lambda key: [e[key] for e in good]  # noqa: E731
    return {
        "median_round_s": statistics.median(pick("median_round_s")),
        "min_round_s": min(pick("min_round_s")),
        "max_round_s": max(pick("max_round_s")),
        "upload_bytes_per_client": statistics.median(pick("upload_bytes_per_client")),
        "peak_rss_mb": max(pick("peak_rss_mb")),
        "error": None,
    }


def _ratio(results: dict[str, Any], top: str, bottom: str) -> float | None:
    a = results.get(top, {}).get("median_round_s")
    b = results.get(bottom, {}).get("median_round_s")
    return None if a is None or not b else round(a / b, 3)


def _ratios(results: dict[str, Any]) -> dict[str, float | None]:
    return {
        "fedge_secaggplus_over_flower_fedavg": _ratio(results, "fedge_secaggplus", "flower_fedavg"),
        "flower_secaggplus_over_fedge_secaggplus": _ratio(
            results, "flower_secaggplus", "fedge_secaggplus"
        ),
    }


if __name__ == "__main__":
    main()
