"""The secure-aggregation protocol alone, no Flower runtime: fedge vs Flower's own primitives.

python -m benchmarks.secagg_micro --clients N --params D [--dropout F] [--k K]

Interleaves the variants, repeats each (after a warm-up) and reports medians:
raw PRG throughput of this machine, one client's masking (fedge's
``ClientSession.masked_input`` vs Flower's ``pseudo_rand_gen`` masks with its
P-384 key agreement), and the server's unmasking (fedge's
``ServerSession.finish`` vs Flower's Shamir ``combine_shares`` plus its mask
regeneration for every survivor and dropped client).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from benchmarks._common import RESULTS, machine, peak_rss_mb, summary, write
from secure_agg import (
    ClientSession,
    EncodingConfig,
    ProtocolPolicy,
    ServerSession,
    SystemRandomSource,
    ThreatModel,
)

NAME = "secagg_micro"


def _prg_bytes_per_s(length: int, repeats: int) -> float:
    out = np.empty(length, dtype=np.uint32)
    view = out.data.cast("B")
    zeros = bytes(view.nbytes)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor().update_into(
            zeros, view
        )
        samples.append(time.perf_counter() - start)
    return view.nbytes / min(samples)


def _fedge_round(clients: int, params: int, k: int, dropout: float) -> tuple[list[float], float]:
    rng = SystemRandomSource()
    encoding = EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=clients, weight_cap=1)
    nodes = list(range(1, clients + 1))
    server = ServerSession(
        nodes,
        degree=k,
        threshold=k // 2 + 1,
        encoding=encoding,
        vector_length=params,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=rng,
    )
    # No corrupt client assumed: the benchmark compares costs at Flower's k and t.
    policy = ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, corrupt_fraction=0.0)
    sessions = {n: ClientSession(s, policy=policy, rng=rng) for n, s in server.setups().items()}
    shares = server.receive_adverts({n: c.advertise() for n, c in sessions.items()})
    routed = server.receive_shares({n: sessions[n].share_keys(shares[n]) for n in sessions})
    dropped = set(nodes[: int(dropout * clients)])
    mask_times = []
    masked = {}
    for n in nodes:
        # As in fedge's client mod: the freshly encoded vector is masked in place.
        vector = np.ones(params, dtype=np.uint32)
        start = time.perf_counter()
        message = sessions[n].masked_input(routed[n], vector, consume=True)
        mask_times.append(time.perf_counter() - start)
        if n not in dropped:
            masked[n] = message
    requests = server.receive_masked(masked)
    responses = {n: sessions[n].unmask(r) for n, r in requests.items()}  # type: ignore[arg-type]
    start = time.perf_counter()
    server.finish(responses)
    return mask_times, time.perf_counter() - start


def _flower_client_mask(params: int, k: int) -> float:
    own = ec.generate_private_key(ec.SECP384R1())
    peers = [ec.generate_private_key(ec.SECP384R1()).public_key() for _ in range(k)]
    dims: list[tuple[int, ...]] = [(params,)]
    start = time.perf_counter()
    vector = [np.zeros(params, dtype=np.int64)]
    vector = [vector[0] + pseudo_rand_gen(os.urandom(32), 1 << 32, dims)[0]]
    for index, peer in enumerate(peers):
        mask = pseudo_rand_gen(generate_shared_key(own, peer), 1 << 32, dims)[0]
        vector = [vector[0] + mask if index % 2 else vector[0] - mask]
    vector = [np.mod(vector[0], 1 << 32)]
    return time.perf_counter() - start


def _flower_server_unmask(clients: int, params: int, k: int, dropout: float) -> float:
    threshold = k // 2 + 1
    dims: list[tuple[int, ...]] = [(params,)]
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    seed_shares = create_shares(os.urandom(32), threshold, k)
    key_shares = create_shares(pem, threshold, k)
    peer = ec.generate_private_key(ec.SECP384R1()).public_key()
    num_dropped = int(dropout * clients)
    total = np.zeros(params, dtype=np.int64)
    start = time.perf_counter()
    for _ in range(clients - num_dropped):
        seed = combine_shares(seed_shares[:threshold])
        total -= pseudo_rand_gen(seed, 1 << 32, dims)[0]
    for _ in range(num_dropped):
        restored = serialization.load_pem_private_key(
            combine_shares(key_shares[:threshold]), password=None
        )
        assert isinstance(restored, ec.EllipticCurvePrivateKey)
        for _ in range(k):
            total += pseudo_rand_gen(generate_shared_key(restored, peer), 1 << 32, dims)[0]
    np.mod(total, 1 << 32, out=total)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--k", type=int, default=8, help="neighbours per client (even)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 clients x 100k parameters")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params = 20, 100_000
    _fedge_round(min(args.clients, 6), 1000, 4, 0.0)  # warm-up
    fedge_mask: list[float] = []
    fedge_unmask: list[float] = []
    flower_mask: list[float] = []
    flower_unmask: list[float] = []
    for _ in range(args.repeats):
        times, unmask = _fedge_round(args.clients, args.params, args.k, args.dropout)
        fedge_mask.append(float(np.median(times)))
        fedge_unmask.append(unmask)
        flower_mask.append(_flower_client_mask(args.params, args.k))
        flower_unmask.append(_flower_server_unmask(args.clients, args.params, args.k, args.dropout))
    prg = _prg_bytes_per_s(args.params, 20)
    mask_bytes = (args.k + 1) * args.params * 4
    document: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine(),
        "parameters": vars(args) | {"out": str(args.out)},
        "prg_bytes_per_s": prg,
        "client_mask_s": summary(fedge_mask)["median"],
        "server_unmask_s": summary(fedge_unmask)["median"],
        "flower_client_mask_s": summary(flower_mask)["median"],
        "flower_server_unmask_s": summary(flower_unmask)["median"],
        "details": {
            "client_mask": summary(fedge_mask),
            "server_unmask": summary(fedge_unmask),
            "flower_client_mask": summary(flower_mask),
            "flower_server_unmask": summary(flower_unmask),
            "client_mask_over_raw_prg": summary(fedge_mask)["median"] / (mask_bytes / prg),
        },
        "ratios": {
            "flower_client_mask_over_fedge": summary(flower_mask)["median"]
            / summary(fedge_mask)["median"],
            "flower_server_unmask_over_fedge": summary(flower_unmask)["median"]
            / summary(fedge_unmask)["median"],
        },
        "peak_rss_mb": peak_rss_mb(),
    }
    write(args.out, document)
    print(f"{'':28}{'fedge':>12}{'flower':>12}{'ratio':>8}")
    for label, ours, theirs in (
        ("client mask (s)", document["client_mask_s"], document["flower_client_mask_s"]),
        ("server unmask (s)", document["server_unmask_s"], document["flower_server_unmask_s"]),
    ):
        print(f"{label:28}{ours:12.4f}{theirs:12.4f}{theirs / ours:8.1f}x")
    print(
        f"raw PRG {prg / 1e9:.2f} GB/s; client masking is "
        f"{document['details']['client_mask_over_raw_prg']:.2f}x the raw PRG time; wrote {args.out}"
    )
    return document


if __name__ == "__main__":
    main()
