"""Model store publish and fetch throughput against a plain file copy, SQLite and PostgreSQL.

Publish = stream a model file into the content-addressed store (SHA-256, fsync,
atomic rename) and commit a signed version; fetch = resolve the latest version
and export its artefact to a file, verifying the digest on the way. Both are
compared, interleaved in one run, with ``shutil.copyfile`` of the same bytes
(``copy``) and with a copy followed by ``fsync`` (``copy_fsync``, the same
durability as the store). Each publish uses fresh random bytes, so nothing is
deduplicated.

Also times building every ONNX variant of the demo model (export FP32 with the
parity check, FP16, INT8 static with calibration, INT8 dynamic, INT4, each
measured on held-out images) — the work a publish with variants adds.

Writes ``benchmarks/results/store.json``: ``backends.{sqlite,postgresql}`` each
with ``publish_mb_s``, ``fetch_mb_s``, ``copy_mb_s``, ``copy_fsync_mb_s`` and the
ratios ``publish_over_copy`` and ``fetch_over_copy``; ``variants`` with
``build_s`` (median), ``min_s``, ``max_s``, ``artefacts``, ``data`` and ``error``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, peak_rss_mb, write
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact

__all__ = ["main"]

_PG_ENV = "FEDGE_TEST_POSTGRES_URL"


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _copy_fsync(source: Path, destination: Path) -> None:
    shutil.copyfile(source, destination)
    with open(destination, "rb+") as handle:
        os.fsync(handle.fileno())


def _backend(url: str, workdir: Path, size: int, repeats: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    engine = open_database(url)
    try:
        root = workdir / "store"
        store = ModelStore(engine, FileBlobStore(root), StoreKey.generate())
        model = f"bench-{secrets.token_hex(3)}"
        samples: dict[str, list[float]] = {
            "publish": [],
            "fetch": [],
            "copy": [],
            "copy_fsync": [],
        }
        source = workdir / "model.bin"
        for attempt in range(repeats + 1):  # the first round warms up
            source.write_bytes(os.urandom(size))
            timings = {
                "copy": _timed(lambda: shutil.copyfile(source, workdir / "copy.bin")),
                "copy_fsync": _timed(lambda: _copy_fsync(source, workdir / "copy2.bin")),
                "publish": _timed(
                    lambda: store.publish(model, [NewArtefact(name="model.bin", data=source)])
                ),
            }
            out = workdir / f"fetched-{attempt}.bin"

            def fetch(destination: Path = out) -> None:
                digest = store.get(model, "latest").manifest.artefacts[0].digest
                store.blobs.export(digest, destination)

            timings["fetch"] = _timed(fetch)
            if attempt > 0:
                for name, seconds in timings.items():
                    samples[name].append(seconds)
            out.unlink()
        megabytes = size / 1e6
        rates = {
            f"{name}_mb_s": round(megabytes / statistics.median(seconds), 1)
            for name, seconds in samples.items()
        }
        return {
            **rates,
            "publish_over_copy": round(rates["publish_mb_s"] / rates["copy_mb_s"], 3),
            "fetch_over_copy": round(rates["fetch_mb_s"] / rates["copy_mb_s"], 3),
            "publish_over_copy_fsync": round(rates["publish_mb_s"] / rates["copy_fsync_mb_s"], 3),
            "fetch_over_copy_fsync": round(rates["fetch_mb_s"] / rates["copy_fsync_mb_s"], 3),
            "median_s": {k: round(statistics.median(v), 4) for k, v in samples.items()},
            "error": None,
        }
    finally:
        engine.dispose()


def _variants(repeats: int) -> dict[str, Any]:
    """Time :func:`simulations.variants.build_model_variants` on the demo CNN."""
    import numpy as np

    from edge_runtime.models import ModelName, build_model
    from fedge.errors import FedgeError
    from fl_server.checkpoints import weights_to_npz
    from simulations.data import load_fashion_mnist
    from simulations.variants import build_model_variants

    try:
        data = load_fashion_mnist()
        held_out = (data.test.images[:2000], data.test.labels[:2000])
        calibration, source = data.train.images[:256], "fashion-mnist"
    except FedgeError:  # no data set here: generated images time the same work
        generator = np.random.default_rng(0)  # benchmark inputs only, not keys or noise
        images = generator.integers(0, 256, (2256, 28, 28), dtype=np.uint8)
        held_out = (images[:2000], generator.integers(0, 10, 2000, dtype=np.uint8))
        calibration, source = images[2000:], "generated"
    network = build_model(ModelName.CNN, seed=0)
    blob = weights_to_npz({k: v.detach().numpy() for k, v in network.state_dict().items()})
    samples: list[float] = []
    count = 0
    with tempfile.TemporaryDirectory(prefix="fedge-variants-bench-") as tmp:
        checkpoint = Path(tmp) / "model.npz"
        checkpoint.write_bytes(blob)
        digest = hashlib.sha256(blob).hexdigest()
        for attempt in range(repeats + 1):  # the first build warms up
            started = time.perf_counter()
            built = build_model_variants(
                checkpoint,
                sha256=digest,
                model=ModelName.CNN,
                held_out=held_out,
                calibration=calibration,
            )
            if attempt > 0:
                samples.append(time.perf_counter() - started)
            count = len(built)
    return {
        "build_s": round(statistics.median(samples), 3),
        "min_s": round(min(samples), 3),
        "max_s": round(max(samples), 3),
        "artefacts": count,
        "data": source,
        "error": None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--pg-url", default=os.environ.get(_PG_ENV), help=f"PostgreSQL [default: ${_PG_ENV}]"
    )
    parser.add_argument(
        "--variant-repeats", type=int, default=3, help="timed variant builds (0 skips them)"
    )
    parser.add_argument("--quick", action="store_true", help="8 MB, 3 repeats, 1 variant build")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeats, args.variant_repeats = 8.0, 3, 1
    size = int(args.size_mb * 1e6)
    backends: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-store-bench-") as tmp:
        work = Path(tmp)
        backends["sqlite"] = _backend(
            f"sqlite:///{work / 'fedge.db'}", work / "sqlite", size, args.repeats
        )
        if args.pg_url:
            try:
                backends["postgresql"] = _backend(args.pg_url, work / "pg", size, args.repeats)
            except Exception as exc:  # the JSON records the failure
                backends["postgresql"] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            backends["postgresql"] = {"error": f"no PostgreSQL URL (--pg-url or ${_PG_ENV})"}
    variants: dict[str, Any] = {"error": "skipped (--variant-repeats 0)"}
    if args.variant_repeats > 0:
        try:
            variants = _variants(args.variant_repeats)
        except Exception as exc:  # the JSON records the failure
            variants = {"error": f"{type(exc).__name__}: {exc}"}
    document = {
        "benchmark": "store",
        "machine": machine(),
        "parameters": {
            "size_mb": args.size_mb,
            "repeats": args.repeats,
            "variant_repeats": args.variant_repeats,
        },
        "backends": backends,
        "variants": variants,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write(args.out or RESULTS / "store.json", document)
    for name, result in backends.items():
        print(f"{name:10} {result}")
    print(f"{'variants':10} {variants}")
    return document


if __name__ == "__main__":
    main()
