"""Cost of a secure round in a real Flower simulation: fedge SecAgg+ vs Flower's, vs plain FedAvg.

Every variant is a Flower 1.42 ``run_simulation`` of N clients whose training is
trivial (add a constant to the D-parameter model), so the protocol dominates:

- ``flower_fedavg_message``: Message-API ``FedAvg.start``, no protection;
- ``flower_fedavg_legacy``: the legacy ``DefaultWorkflow`` with its ``FedAvg``, no protection;
- ``flower_fedavg`` (derived): the faster of the two (``path`` says which); every
  ratio is against it;
- ``flower_secaggplus``: Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod`` on its
  legacy strategy path (``SecAggWorkflow`` + ``secagg_mod`` with ``--classic``);
- ``fedge_secaggplus``: Message-API ``FedAvg`` through fedge's ``SecureAggregationGrid``
  and ``make_secagg_mod`` (semi-honest server, 32-bit ring), its rounds keyed in advance
  on a server-drawn graph as Flower's SecAgg+ draws its own (two full-fleet trips in
  steady state: keys, shares and masked input, then unmask);
- ``fedge_secaggplus_device_graph``: the same with holders each device draws itself
  (what the active model requires: three trips);
- ``fedge_secaggplus_classic_keying``: the device-drawn round keyed the classic way
  (advertise keys, then share keys: four trips), for the ratio of the keyings in one run;
- ``fedge_secaggplus_ddp``: the same with distributed DP (each client clips to L2 1,
  rotates, rounds and adds discrete Gaussian noise of multiplier 1 before masking).

Round time is the time between the strategy's successive central evaluations,
after one warm-up round (Ray's start-up and first imports are excluded);
upload bytes are counted on the Grid for every reply;
``breakdown`` says where the median round's time went (:func:`breakdown`): the
server's own compute, each exchange (stage) with its bytes both ways and the
clients' CPU in their ClientApps, and an estimate of the engine's share;
peak RSS sums this process and its descendants (Ray's workers), sampled every 200 ms.
Variants run interleaved across ``--repeats``.

Run: ``python -m benchmarks.secagg_round --clients 100 --params 1000000 --rounds 3 --k 8``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, machine, write
from fl_server.secagg import payload_bytes
from simulations.offline import apply_offline_env, quiet_flower, ray_backend_config

VARIANTS = (
    "flower_fedavg_message",
    "flower_fedavg_legacy",
    "flower_secaggplus",
    "fedge_secaggplus",
    "fedge_secaggplus_device_graph",
    "fedge_secaggplus_classic_keying",
    "fedge_secaggplus_ddp",
)
# ``flower_fedavg`` in the JSON (and in --variants) is the faster of Flower's two plain paths.
_FEDAVG_PATHS = {"flower_fedavg_message": "message", "flower_fedavg_legacy": "legacy"}
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
        # Every 200 ms: each sample reads /proc of every process (at 50 ms it was 19 % of
        # the driver's CPU in a 100-client round).
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _tree_rss_bytes(self._root))

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class _Exchange:
    """One ``send_and_receive`` on the Grid: a stage's full-fleet round trip."""

    start: float
    end: float
    upload: int
    download: int
    messages: int


class _Counter:
    """Counts the bytes and times of every exchange through a Grid, and the clients' compute.

    Times are ``time.monotonic()``, one clock for every process of the machine
    (Linux's CLOCK_MONOTONIC), so the clients' records (written by
    :meth:`client_mod` in Ray's workers) fall inside the exchange that asked for them.
    """

    def __init__(self) -> None:
        self.upload = 0
        self.times: list[float] = []
        self.stages: list[dict[str, float]] = []
        self.exchanges: list[_Exchange] = []
        self.timing_dir = Path(tempfile.mkdtemp(prefix="fedge-bench-clients-"))

    def wrap(self, grid: Any) -> None:
        original = grid.send_and_receive

        def counting(messages: Iterable[Any], *, timeout: float | None = None) -> Any:
            sent = list(messages)
            down = sum(payload_bytes(m.content) for m in sent if m.has_content())
            start = time.monotonic()
            replies = list(original(sent, timeout=timeout))
            end = time.monotonic()
            up = sum(payload_bytes(r.content) for r in replies if r.has_content())
            self.upload += up
            self.exchanges.append(_Exchange(start, end, up, down, len(sent)))
            return replies

        grid.send_and_receive = counting

    def tick(self) -> None:
        self.times.append(time.monotonic())

    def client_mod(self) -> Callable[[Any, Any, Any], Any]:
        """Return the outermost client mod: it logs each message's CPU and wall time."""
        directory = str(self.timing_dir)

        def timing(msg: Any, context: Any, call_next: Any) -> Any:
            import os

            wall, cpu = time.monotonic(), time.process_time()
            reply = call_next(msg, context)
            record = f"{wall} {time.process_time() - cpu} {time.monotonic() - wall}\n"
            with open(f"{directory}/{os.getpid()}.log", "a", encoding="ascii") as log:
                log.write(record)
            return reply

        return timing

    def client_records(self) -> list[tuple[float, float, float]]:
        """Return every client message's (start, CPU seconds, wall seconds); removes the logs."""
        records = []
        for log in self.timing_dir.glob("*.log"):
            for line in log.read_text(encoding="ascii").splitlines():
                start, cpu, wall = (float(v) for v in line.split())
                records.append((start, cpu, wall))
        shutil.rmtree(self.timing_dir, ignore_errors=True)
        return records


def breakdown(
    *,
    start: float,
    end: float,
    exchanges: list[_Exchange],
    client_records: list[tuple[float, float, float]],
    clients: int,
    actors: int,
    stage_names: list[str] | None = None,
) -> dict[str, Any]:
    """Return where one round's time went: server, exchanges (engine and clients), bytes.

    ``server_s``: the round's time outside the Grid's exchanges (the server's own
    compute: sampling, aggregation, unmasking, decoding). ``exchange_s``: inside
    them (message delivery and the clients' work). ``client_cpu_s_per_client``:
    the clients' CPU time in their ClientApps (mods included), per client.
    ``engine_s`` estimates the engine's share of the exchanges as exchange_s less
    the clients' CPU spread over ``actors`` workers (an estimate: both share the
    cores).
    """
    # An exchange of no messages (a strategy's skipped evaluation) is no stage.
    inside = [e for e in exchanges if start <= e.start and e.end <= end and e.messages]
    names = (
        stage_names
        if stage_names is not None and len(stage_names) == len(inside)
        else [f"exchange-{i + 1}" for i in range(len(inside))]
    )
    stages = []
    client_cpu = 0.0
    for name, exchange in zip(names, inside, strict=True):
        cpu = sum(c for s, c, _ in client_records if exchange.start <= s <= exchange.end)
        client_cpu += cpu
        stages.append(
            {
                "name": name,
                "exchange_s": round(exchange.end - exchange.start, 4),
                "client_cpu_s_per_client": round(cpu / max(exchange.messages, 1), 5),
                "upload_bytes": exchange.upload,
                "download_bytes": exchange.download,
                "messages": exchange.messages,
            }
        )
    exchange_s = sum(e.end - e.start for e in inside)
    return {
        "round_s": round(end - start, 4),
        "server_s": round(end - start - exchange_s, 4),
        "exchange_s": round(exchange_s, 4),
        "engine_s": round(max(exchange_s - client_cpu / max(actors, 1), 0.0), 4),
        "client_cpu_s_per_client": round(client_cpu / max(clients, 1), 5),
        "upload_bytes_per_client": round(sum(e.upload for e in inside) / max(clients, 1)),
        "download_bytes_per_client": round(sum(e.download for e in inside) / max(clients, 1)),
        "stages": stages,
    }


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

    secure = variant.startswith("fedge_secaggplus")
    if variant != "flower_fedavg_message" and not secure:
        raise ValueError(f"not a Message-API variant: {variant}")
    prekeys = variant != "fedge_secaggplus_classic_keying"
    server_graph = variant in ("fedge_secaggplus", "fedge_secaggplus_ddp")
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
        prekeys=prekeys,
        server_graph=server_graph,
    )
    # The devices accept the k and t compared with Flower's (no corrupt client assumed:
    # this benchmark measures cost at equal k, not the threshold rule).
    policy = DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=ThreatModel.SEMI_HONEST,
            corrupt_fraction=0.0,
            min_degree=1,
            accept_server_graph=server_graph,
        ),
        min_honest_contributors=config.min_honest_contributors(clients),
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


def _flower_legacy_apps(  # noqa: PLR0917 - one benchmark's private helper
    clients: int,
    params: int,
    rounds: int,
    k: int,
    t: int,
    counter: _Counter,
    *,
    classic: bool,
    secure: bool = True,
) -> tuple[Any, Any]:
    """Flower's legacy strategy path: ``DefaultWorkflow``, with its SecAgg(+) or plain."""
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

    secagg = [secagg_mod if classic else secaggplus_mod] if secure else []
    client = ClientApp(
        client_fn=lambda context: _Trivial().to_client(), mods=[counter.client_mod(), *secagg]
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
        if not secure:
            DefaultWorkflow()(grid, legacy)
            return
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
    app_pickle: str = "once",
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
    if variant in ("flower_secaggplus", "flower_fedavg_legacy"):
        server, client = _flower_legacy_apps(
            clients,
            params,
            total_rounds,
            k,
            t,
            counter,
            classic=classic,
            secure=variant == "flower_secaggplus",
        )
    else:
        server, client = _message_api_apps(
            variant, clients, params, total_rounds, k, t, counter, ring_bits
        )
    return simulate(
        server,
        client,
        entry,
        counter,
        num_supernodes=clients,
        per_round=clients,
        rounds=rounds,
        app_pickle=app_pickle,
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
    app_pickle: str = "once",
) -> dict[str, Any]:
    """Run one simulation (a warm-up round, then ``rounds``) and fill in ``entry``'s timings.

    ``linkstate``: ``"indexed"`` (fedge's :class:`simulations.linkstate.IndexedLinkState`,
    what ``fedge sim run`` uses) or ``"flower"`` (Flower's own in-memory LinkState).
    ``app_pickle``: ``"once"`` (:func:`simulations.app_pickle.prepickled`, what ``fedge
    sim run`` uses) or ``"flower"`` (Ray pickles the ClientApp for every message).
    """
    from flwr.simulation import run_simulation

    from simulations.app_pickle import prepickled
    from simulations.linkstate import indexed_linkstate

    if app_pickle == "once":
        client = prepickled(client)
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
        # Read (and remove) the clients' timing logs however the run ended.
        client_records = counter.client_records()
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
    # Where the median round's time went (the lower middle of an even count; lap i runs
    # from tick i + 1 to tick i + 2).
    middle = sorted(range(len(laps)), key=lambda i: laps[i])[(len(laps) - 1) // 2]
    names = list(counter.stages[middle + 1]) if len(counter.stages) > middle + 1 else None
    entry["breakdown"] = breakdown(
        start=counter.times[middle + 1],
        end=counter.times[middle + 2],
        exchanges=counter.exchanges,
        client_records=client_records,
        clients=per_round,
        actors=_cores(),
        stage_names=names,
    )
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
    parser.add_argument(
        "--app-pickle",
        choices=("once", "flower"),
        default="once",
        help="the ClientApp pickled once (as fedge runs it) or for every message (as shipped)",
    )
    parser.add_argument("--quick", action="store_true", help="20 clients x 100k parameters, k 4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.rounds, args.k = 20, 100_000, 2, 4
    apply_offline_env()
    k = args.clients - 1 if args.classic else args.k
    t = args.t or (math.ceil(args.clients / 2) + 1 if args.classic else k // 2 + 1)
    variants: list[str] = []
    for name in (v for v in args.variants.split(",") if v):
        expanded = list(_FEDAVG_PATHS) if name == "flower_fedavg" else [name]
        if not set(expanded) <= set(VARIANTS):
            parser.error(f"unknown variant {name!r}; choose from flower_fedavg, {VARIANTS}")
        variants.extend(v for v in expanded if v not in variants)
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
                app_pickle=args.app_pickle,
            )
            print(f"    {entry}", flush=True)
            runs[variant].append(entry)
    results = {v: _merge(entries) for v, entries in runs.items()}
    faster = _faster_fedavg(results)
    if faster is not None:
        results["flower_fedavg"] = {**results[faster], "path": _FEDAVG_PATHS[faster]}
    elif any(path in results for path in _FEDAVG_PATHS):
        # Both plain paths failed: the key stays, with their errors (never a missing key).
        errors = "; ".join(f"{p}: {results[p]['error']}" for p in _FEDAVG_PATHS if p in results)
        results["flower_fedavg"] = {
            **dict.fromkeys(
                ("median_round_s", "min_round_s", "max_round_s", "upload_bytes_per_client")
            ),
            **dict.fromkeys(("peak_rss_mb", "breakdown", "path")),
            "error": errors,
        }
    for entry in results.values():
        upload = entry.get("upload_bytes_per_client")
        entry["upload_bits_per_parameter"] = (
            None if upload is None else round(8 * upload / args.params, 3)
        )
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


def _faster_fedavg(results: dict[str, Any]) -> str | None:
    timed = [
        (results[v]["median_round_s"], v)
        for v in _FEDAVG_PATHS
        if v in results and results[v].get("median_round_s") is not None
    ]
    return min(timed)[1] if timed else None


def _merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
    good = [e for e in entries if e["error"] is None]
    if not good:
        return entries[0]
    pick: Callable[[str], list[float]] = lambda key: [e[key] for e in good]  # noqa: E731
    # The breakdown of the repeat whose median round is the median of the repeats'.
    typical = sorted(good, key=lambda e: e["median_round_s"])[len(good) // 2]
    return {
        "breakdown": typical.get("breakdown"),
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
        "fedge_secaggplus_ddp_over_flower_fedavg": _ratio(
            results, "fedge_secaggplus_ddp", "flower_fedavg"
        ),
        "flower_secaggplus_over_fedge_secaggplus": _ratio(
            results, "flower_secaggplus", "fedge_secaggplus"
        ),
        "fedge_secaggplus_device_graph_over_fedge_secaggplus": _ratio(
            results, "fedge_secaggplus_device_graph", "fedge_secaggplus"
        ),
        "fedge_secaggplus_classic_keying_over_fedge_secaggplus_device_graph": _ratio(
            results, "fedge_secaggplus_classic_keying", "fedge_secaggplus_device_graph"
        ),
        "flower_fedavg_legacy_over_flower_fedavg_message": _ratio(
            results, "flower_fedavg_legacy", "flower_fedavg_message"
        ),
    }


if __name__ == "__main__":
    main()
