"""Model store publish and fetch throughput against a plain file copy, SQLite and PostgreSQL.

Publish = stream a model file into the content-addressed store (SHA-256, fsync,
atomic rename) and commit a signed version; fetch = resolve the latest version
and export its artefact to a file, verifying the digest on the way. Both are
compared, interleaved in one run, with ``shutil.copyfile`` of the same bytes
(``copy``) and with a copy followed by ``fsync`` (``copy_fsync``, the same
durability as the store). Each publish uses fresh random bytes, so nothing is
deduplicated.

Writes ``benchmarks/results/store.json``: ``backends.{sqlite,postgresql}`` each
with ``publish_mb_s``, ``fetch_mb_s``, ``copy_mb_s``, ``copy_fsync_mb_s`` and the
ratios ``publish_over_copy`` and ``fetch_over_copy``.
"""

from __future__ import annotations

import argparse
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
            "median_s": {k: round(statistics.median(v), 4) for k, v in samples.items()},
            "error": None,
        }
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--pg-url", default=os.environ.get(_PG_ENV), help=f"PostgreSQL [default: ${_PG_ENV}]"
    )
    parser.add_argument("--quick", action="store_true", help="8 MB, 3 repeats")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeats = 8.0, 3
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
    document = {
        "benchmark": "store",
        "machine": machine(),
        "parameters": {"size_mb": args.size_mb, "repeats": args.repeats},
        "backends": backends,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write(args.out or RESULTS / "store.json", document)
    for name, result in backends.items():
        print(f"{name:10} {result}")
    return document


if __name__ == "__main__":
    main()
