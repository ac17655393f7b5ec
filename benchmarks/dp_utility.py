"""Accuracy for a privacy budget on Fashion-MNIST: no DP, central, distributed, sample-level DP.

Client-level DP on a population of ``--clients`` (Dirichlet ``--alpha``) with
``--per-round`` sampled each round, all through ``fedge sim run``'s engine
(Flower simulation, real training):

- ``non_private``: FedAvg;
- ``central``: clients clip to ``--dp-clip``, the server adds Gaussian noise;
- ``distributed``: distributed discrete Gaussian under SecAgg+ at ``--ring-bits``.

Both DP variants are calibrated to the same (``--epsilon``, ``--delta``) after
``--rounds`` rounds, accounted the same way: at sample rate 1 (Flower samples
a fixed-size set, so neither claims amplification by sampling), central by
Opacus' RDP accountant, distributed by the DDG zCDP bound with the survivors
it really has. Then sample-level DP-SGD (Opacus) on ``--sample-clients``
clients, each device at ``--sample-epsilon`` over the run, against the same
clients without DP (``sample_non_private``), and shared-noise DP-SGD
(``sample_distributed``: one DP-SGD step a round over every device's examples, each
device adding its share of the noise under SecAgg+, ``--shared-rounds`` rounds at
example sample rate ``--shared-sample-rate``, FedAvgM momentum on the server) at the
same example-level epsilon. Its ``general_bound_epsilon`` is what the fully general
Poisson-subsampled zCDP bound (Zhu and Wang 2019) gives at the same noise.

Writes ``benchmarks/results/dp_utility.json``: ``variants.NAME`` with
``accuracy``, ``epsilon``, ``delta``, ``bits_per_param`` (upload per parameter)
and ``noise_multiplier``; ``gaps`` in percentage points.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, peak_rss_mb, write
from edge_runtime.models import ModelName, build_model
from fl_client.training import TrainConfig
from fl_server.secagg_config import SecAggConfig
from simulations.config import SimConfig
from simulations.modes import DpMode
from simulations.partition import PartitionMode
from simulations.run import RunPaths, new_run_id, prepare_data, run_federation
from strategies.accounting import (
    GaussianSteps,
    ddg_rho,
    gaussian_epsilon,
    subsampled_zcdp_epsilon,
    zcdp_epsilon,
)
from strategies.ddp import DistributedDpSettings
from strategies.rotation import rotated_length
from strategies.rules import AggregationRule, StrategySpec

__all__ = ["main"]

VARIANTS = (
    "non_private",
    "central",
    "distributed",
    "sample_non_private",
    "sample_level",
    "sample_distributed",
)


def _bisect(epsilon_of: Callable[[float], float], target: float) -> float:
    """Return the smallest noise multiplier whose epsilon is at most ``target``."""
    low, high = 0.05, 200.0
    for _ in range(60):
        middle = math.sqrt(low * high)
        if epsilon_of(middle) > target:
            low = middle
        else:
            high = middle
    return high


def central_multiplier(*, epsilon: float, delta: float, rounds: int) -> float:
    """The Gaussian noise multiplier reaching ``epsilon`` after ``rounds`` at sample rate 1."""
    return _bisect(
        lambda z: gaussian_epsilon(
            [GaussianSteps(noise_multiplier=z, sample_rate=1.0, steps=rounds)], delta=delta
        ),
        epsilon,
    )


def distributed_multiplier(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    dimension: int,
    sampled: int,
    min_honest: int,
    l2_clip: float,
    ring_bits: int,
) -> float:
    """The DDG noise multiplier reaching ``epsilon`` after ``rounds``.

    Charged as the devices and the server charge it: with only the noise of the
    ``min_honest`` honest clients every round must hold.
    """

    def epsilon_of(z: float) -> float:
        settings = DistributedDpSettings(l2_clip=l2_clip, noise_multiplier=z, ring_bits=ring_bits)
        config = settings.for_round(
            dimension=dimension,
            sampled=sampled,
            min_honest=min_honest,
            rotation_seed=bytes(32),
        )
        rho = ddg_rho(
            l2_sensitivity=config.l2_sensitivity,
            l1_sensitivity=config.l1_sensitivity,
            sigma=config.sigma_integer,
            num_clients=min_honest,
            dimension=rotated_length(dimension),
        )
        return zcdp_epsilon(rounds * rho, delta=delta)

    return _bisect(epsilon_of, epsilon)


def _run(name: str, config: SimConfig, workdir: Path) -> dict[str, Any]:
    run_id = new_run_id()
    paths = RunPaths(
        summary=workdir / name / "summary.json",
        models=workdir / name / "models",
        db_url=f"sqlite:///{workdir / 'fedge.db'}",
    )
    started = time.perf_counter()
    # Flower's sample_nodes draws with Python's `random`: seeding it gives every variant the
    # same sequence of sampled clients, so they differ by their mechanism, not their luck.
    # (Sampling only; keys, masks and noise still come from the OS CSPRNG.)
    random.seed(config.seed)
    print(f"[dp_utility] {name}: {config.num_clients} clients, {config.num_rounds} rounds ...")
    summary = run_federation(config, paths, run_id=run_id, prepared=prepare_data(config))
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in build_model(ModelName.CNN).state_dict().values())
    last = summary.rounds[-1] if summary.rounds else {}
    secure = last.get("secure_aggregation")
    bits = 32.0 if secure is None else secure["upload_bytes_per_client"] * 8 / params
    privacy = summary.privacy or {}
    result = {
        "accuracy": summary.final_accuracy,
        "accuracy_by_round": [r["accuracy"] for r in summary.rounds],
        # Noisy rounds swing a few points; the last five rounds' mean compares more fairly.
        "accuracy_last5_mean": (
            round(sum(r["accuracy"] for r in summary.rounds[-5:]) / len(summary.rounds[-5:]), 4)
            if summary.rounds
            else None
        ),
        "epsilon": privacy.get("epsilon"),
        "max_client_epsilon": privacy.get("max_client_epsilon"),
        "delta": privacy.get("delta"),
        "noise_multiplier": (
            None
            if config.dp in (DpMode.OFF, DpMode.SAMPLE)  # DP-SGD: each device picks its own
            else config.shared_noise_multiplier
            if config.dp is DpMode.SAMPLE_DISTRIBUTED
            else config.noise_multiplier
        ),
        "train": {
            "batch_size": config.train.batch_size,
            "learning_rate": config.train.learning_rate,
            "momentum": config.train.momentum,
        },
        "bits_per_param": round(bits, 3),
        "amplification": privacy.get("amplification"),
        "seconds": round(seconds, 1),
        "error": None,
    }
    if config.dp is DpMode.SAMPLE_DISTRIBUTED:
        z = config.shared_noise_multiplier
        result["sample_rate"] = config.dp_sample_rate
        result["general_bound_epsilon"] = subsampled_zcdp_epsilon(
            rho=1 / (2 * z * z),
            sample_rate=config.dp_sample_rate,
            steps=config.num_rounds,
            delta=config.delta,
        )
    print(f"[dp_utility] {name}: accuracy {summary.final_accuracy}, {result}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="population")
    parser.add_argument("--per-round", type=int, default=100, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epsilon", type=float, default=10.0, help="client-level budget")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0, help="partition, model, client sampling")
    parser.add_argument("--dp-clip", type=float, default=0.5, help="client update L2 bound")
    parser.add_argument("--ring-bits", type=int, default=16, help="distributed DP's ring")
    parser.add_argument("--secagg-dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate")
    parser.add_argument("--sample-clients", type=int, default=10)
    parser.add_argument("--sample-rounds", type=int, default=5)
    parser.add_argument("--sample-epsilon", type=float, default=3.0)
    parser.add_argument(
        "--sample-batch-size", type=int, default=128, help="DP-SGD's expected batch size"
    )
    parser.add_argument("--sample-lr", type=float, default=0.1, help="DP-SGD's learning rate")
    parser.add_argument("--sample-momentum", type=float, default=0.9)
    parser.add_argument("--sample-clip", type=float, default=1.0, help="per-example bound")
    parser.add_argument(
        "--shared-rounds", type=int, default=200, help="sample_distributed: DP-SGD steps"
    )
    parser.add_argument(
        "--shared-sample-rate", type=float, default=0.02, help="sample_distributed: q"
    )
    parser.add_argument("--shared-lr", type=float, default=0.3, help="sample_distributed: step")
    parser.add_argument(
        "--shared-momentum", type=float, default=0.9, help="sample_distributed: FedAvgM"
    )
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument("--test-examples", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="a reduced size (about a minute)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.per_round, args.rounds = 40, 10, 2
        args.sample_clients, args.sample_rounds = 2, 1
        args.shared_rounds, args.shared_sample_rate = 3, 0.2
        args.train_examples, args.test_examples = 4000, 1000
    chosen = [v for v in args.variants.split(",") if v]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    dimension = sum(p.numel() for p in build_model(ModelName.CNN).state_dict().values())
    z_central = central_multiplier(epsilon=args.epsilon, delta=args.delta, rounds=args.rounds)
    z_distributed = distributed_multiplier(
        epsilon=args.epsilon,
        delta=args.delta,
        rounds=args.rounds,
        dimension=dimension,
        sampled=args.per_round,
        min_honest=SecAggConfig(dropout_fraction=args.secagg_dropout).min_honest_contributors(
            args.per_round
        ),
        l2_clip=args.dp_clip,
        ring_bits=args.ring_bits,
    )
    base = SimConfig(
        num_clients=args.clients,
        num_rounds=args.rounds,
        seed=args.seed,
        partition=PartitionMode.DIRICHLET,
        alpha=args.alpha,
        fraction_train=args.per_round / args.clients,
        train=TrainConfig(learning_rate=args.lr),
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        delta=args.delta,
        dp_clip=args.dp_clip,
    )
    configs = {
        "non_private": base,
        "central": replace(base, dp=DpMode.CENTRAL, noise_multiplier=z_central),
        "distributed": replace(
            base,
            dp=DpMode.DISTRIBUTED,
            secure_agg=True,
            secagg_dropout=args.secagg_dropout,
            ring_bits=args.ring_bits,
            noise_multiplier=z_distributed,
        ),
    }
    few = replace(
        base,
        num_clients=args.sample_clients,
        num_rounds=args.sample_rounds,
        fraction_train=1.0,
    )
    configs["sample_non_private"] = few
    # DP-SGD wants larger batches (the noise is divided by the batch); tuned on this task
    # (batch 32-512, lr 0.05-2, momentum 0-0.9, clip 0.1-1: 0.74-0.77 after 5 rounds);
    # the non-private baseline keeps fedge's defaults.
    configs["sample_level"] = replace(
        few,
        dp=DpMode.SAMPLE,
        epsilon=args.sample_epsilon,
        dp_clip=args.sample_clip,
        train=TrainConfig(
            batch_size=args.sample_batch_size,
            learning_rate=args.sample_lr,
            momentum=args.sample_momentum,
        ),
    )
    configs["sample_distributed"] = replace(
        few,
        num_rounds=args.shared_rounds,
        dp=DpMode.SAMPLE_DISTRIBUTED,
        secure_agg=True,
        secagg_dropout=0.0,
        ring_bits=32,
        epsilon=args.sample_epsilon,
        dp_clip=args.sample_clip,
        dp_sample_rate=args.shared_sample_rate,
        train=TrainConfig(learning_rate=args.shared_lr),
        strategy=StrategySpec(
            rule=AggregationRule.FEDAVGM,
            options=(("server_learning_rate", 1.0), ("server_momentum", args.shared_momentum)),
        ),
    )
    variants: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-dp-utility-") as tmp:
        for name in chosen:
            try:
                variants[name] = _run(name, configs[name], Path(tmp))
            except Exception as exc:  # the JSON records the failure
                variants[name] = {"accuracy": None, "error": f"{type(exc).__name__}: {exc}"}
                print(f"[dp_utility] {name} failed: {exc}", file=sys.stderr)

    def gap(a: str, b: str, key: str = "accuracy") -> float | None:
        x, y = variants.get(a, {}).get(key), variants.get(b, {}).get(key)
        return None if x is None or y is None else round(100 * (x - y), 2)

    document = {
        "benchmark": "dp_utility",
        "machine": machine(),
        "parameters": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "model_params": dimension,
            "central_noise_multiplier": z_central,
            "distributed_noise_multiplier": z_distributed,
        },
        "variants": variants,
        "gaps": {
            "central_minus_distributed_points": gap("central", "distributed"),
            "non_private_minus_central_points": gap("non_private", "central"),
            "sample_non_private_minus_sample_level_points": gap(
                "sample_non_private", "sample_level"
            ),
            "sample_non_private_minus_sample_distributed_points": gap(
                "sample_non_private", "sample_distributed"
            ),
            "last5_central_minus_distributed_points": gap(
                "central", "distributed", "accuracy_last5_mean"
            ),
            "last5_sample_non_private_minus_sample_level_points": gap(
                "sample_non_private", "sample_level", "accuracy_last5_mean"
            ),
        },
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write(args.out or RESULTS / "dp_utility.json", document)
    print(
        "variant              accuracy  epsilon   bits/param  noise z\n"
        + "\n".join(
            f"{name:20} {v.get('accuracy')!s:9.9} {v.get('epsilon')!s:9.9} "
            f"{v.get('bits_per_param')!s:11.11} {v.get('noise_multiplier')!s:.6}"
            for name, v in variants.items()
        )
    )
    print(f"gaps (points): {document['gaps']}")
    return document


if __name__ == "__main__":
    main()
