"""N devices fetching one offered model variant at once from ``fedge store serve``, over TLS.

The question: how does the store server hold a fleet-wide download burst (a canary
or a full rollout: every device fetches the same artefact at the same moment)?

``fedge``: the real :class:`~fl_server.store.serve.StoreServer` over TLS, on a
SQLite store with an audit log and an access-log file, every request signed by a
distinct enrolled device (``secure_agg.request_auth``): the signature check, the
offer lookup, the verified open (one SHA-256 pass, then the memo), the ranged
stream, the access line and the ``store.downloaded`` audit event all run.
``plain``: the standard library's ``ThreadingHTTPServer`` with
``SimpleHTTPRequestHandler`` serving the same bytes from a directory, over TLS with
the handshake in each connection's thread and the same listen backlog as fedge's
(so the comparison isolates what fedge does per request, not how sockets are set
up). Each run starts a fresh server process (its peak RSS is that run's alone) and
``--client-processes`` client processes whose threads, one per device, are all
released at one instant; a device's latency runs from its TCP connect to the last
byte of the body. The clients send the same signed header to both servers.

A warm-up run of each comes first; then ``--repeats`` runs of each, alternating
which goes first. Writes ``benchmarks/results/store_serve.json``:
``variants.{fedge, plain}`` each with ``total_s`` (median/min/max over the runs),
``mb_s`` (aggregate: devices x size / total, median), ``latency_s`` (``p50``,
``p95``, ``max``: medians over the runs of each run's percentile), ``errors``
(summed), ``error_samples``, ``peak_rss_mb`` and ``idle_rss_mb`` (server process:
its high-water mark, and its resident size before the burst; max over runs),
``error`` (null or why the variant could not run); ``fedge`` adds
``audit_events`` (``store.downloaded`` events recorded per run, which should equal
the devices), ``audit_drain_s`` (how long the audit writer still had to go when
the last device was done) and ``access_log_lines``; ``ratios`` with
``fedge_over_plain_total_s``, ``fedge_over_plain_mb_s``, ``fedge_over_plain_p95``
and ``fedge_over_plain_peak_rss``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
import traceback
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, peak_rss_mb, write

__all__ = ["main"]

MB = 1_000_000
_AUTHORITY_SEED = 15
_MAX_SAMPLES = 5


def _status_mb(field: str) -> float:
    """Return a ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """Write a CA, a server certificate for localhost issued by it, and its key."""
    from fl_server.pki import (
        certificate_to_pem,
        create_ca,
        issue_server_certificate,
        private_key_to_pem,
    )

    now = datetime.now(UTC)
    ca_key, ca_cert = create_ca("store-serve bench CA", valid_days=2, now=now)
    key, cert = issue_server_certificate(
        ca_key, ca_cert, sans=["localhost", "127.0.0.1"], valid_days=1, now=now
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(certificate_to_pem(ca_cert))
    paths[1].write_bytes(certificate_to_pem(cert))
    paths[2].write_bytes(private_key_to_pem(key))
    return paths


def _prepare(workdir: Path, size: int) -> dict[str, Any]:
    """Publish ``size`` random bytes to a fresh store; put the same bytes in a plain directory."""
    from fl_server.audit import AuditLog
    from fl_server.db import open_database
    from fl_server.store.blobs import FileBlobStore
    from fl_server.store.keys import StoreKey
    from fl_server.store.serve import LISTEN_BACKLOG
    from fl_server.store.store import ModelStore, NewArtefact

    data = os.urandom(size)
    url = f"sqlite:///{workdir / 'fedge.db'}"
    engine = open_database(url)
    try:
        store = ModelStore(
            engine,
            FileBlobStore(workdir / "store"),
            StoreKey.load_or_create(workdir / "store" / "store-key.pem"),
            audit=AuditLog(engine),
        )
        version = store.publish("bench", [NewArtefact(name="model-int8.onnx", data=data)])
        digest = version.manifest.artefacts[0].digest
    finally:
        engine.dispose()
    plain = workdir / "plain"
    (plain / "v1" / "objects").mkdir(parents=True)
    (plain / "v1" / "objects" / digest).write_bytes(data)  # the same URL as fedge's
    ca, cert, key = _tls_material(workdir)
    return {
        "db_url": url,
        "store_dir": str(workdir / "store"),
        "plain_dir": str(plain),
        "digest": digest,
        "size": size,
        "ca": str(ca),
        "cert": str(cert),
        "key": str(key),
        "workdir": str(workdir),
        "backlog": LISTEN_BACKLOG,
    }


class _PlainTLSServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` over TLS, the handshake in each connection's thread."""

    daemon_threads = True

    def __init__(self, directory: str, context: Any, backlog: int) -> None:
        self.request_queue_size = backlog  # the same listen backlog as fedge's server

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=directory, **kwargs)

        super().__init__(("127.0.0.1", 0), Handler)
        self.tls = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(120)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except OSError:
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            self.shutdown_request(wrapped)


def _serve(variant: str, setup: dict[str, Any], channel: Connection) -> None:
    """Run one server until told to stop; report its port, RSS and (fedge) audit figures."""
    import contextlib
    import ssl
    import sys

    try:
        if variant == "plain":
            # Only the standard library in this process: its RSS is the plain server's own.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2  # as edge_runtime.tls does
            context.load_cert_chain(setup["cert"], setup["key"])
            log = open(Path(setup["workdir"]) / "plain-access.log", "a")  # noqa: SIM115
            sys.stderr = log  # SimpleHTTPRequestHandler logs each request to stderr
            plain = _PlainTLSServer(setup["plain_dir"], context, setup["backlog"])
            thread = threading.Thread(target=plain.serve_forever, daemon=True)
            thread.start()
            channel.send(("ready", plain.server_address[1], _status_mb("VmRSS")))
            channel.recv()
            plain.shutdown()
            plain.server_close()
            log.close()
            channel.send(("done", _status_mb("VmHWM"), {}))
            return
        from edge_runtime.tls import tls_context
        from fl_server.audit import AuditEventKind, AuditLog
        from fl_server.db import open_database
        from fl_server.store.blobs import FileBlobStore
        from fl_server.store.keys import StoreKey
        from fl_server.store.serve import StoreServer
        from fl_server.store.store import ModelStore
        from secure_agg.identity import EnrolmentAuthority
        from secure_agg.randomness import DeterministicRandom

        context = tls_context(Path(setup["cert"]), Path(setup["key"]))
        authority = EnrolmentAuthority.generate(DeterministicRandom(_AUTHORITY_SEED))
        engine = open_database(setup["db_url"])
        audit = AuditLog(engine)
        before = sum(1 for e in audit.iter() if e.kind is AuditEventKind.MODEL_DOWNLOADED)
        store_dir = Path(setup["store_dir"])
        store = ModelStore(
            engine,
            FileBlobStore(store_dir),
            StoreKey.load_or_create(store_dir / "store-key.pem"),
            audit=audit,
        )
        access_log = Path(setup["workdir"]) / f"fedge-access-{os.getpid()}.log"
        server = StoreServer(
            store,
            authority_public_key=authority.public_key,
            tls=context,
            socket_timeout_s=120,
            access_log=access_log,
        )
        server.start()
        channel.send(("ready", server.port, _status_mb("VmRSS")))
        channel.recv()  # the last device is done
        started = time.perf_counter()
        server.stop()  # waits for the audit writer to record every queued download
        drain_s = time.perf_counter() - started
        lines = -1
        after = sum(1 for e in audit.iter() if e.kind is AuditEventKind.MODEL_DOWNLOADED)
        with contextlib.suppress(OSError):
            lines = len(access_log.read_text().splitlines())
        engine.dispose()
        extras = {"audit_events": after - before, "audit_drain_s": drain_s, "access_lines": lines}
        channel.send(("done", _status_mb("VmHWM"), extras))
    except BaseException as exc:
        channel.send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def _fetch(
    port: int, target: str, header: str, context: Any, *, size: int, check: str | None
) -> tuple[float, str | None]:
    """One device's download; return its latency and None, or the error."""
    started = time.perf_counter()
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=300)
    try:
        connection.request("GET", target, headers={"Authorization": header})
        response = connection.getresponse()
        received = 0
        digest = hashlib.sha256() if check is not None else None
        while chunk := response.read(1 << 20):
            received += len(chunk)
            if digest is not None:
                digest.update(chunk)
        elapsed = time.perf_counter() - started
        if response.status != 200:
            return elapsed, f"HTTP {response.status}"
        if received != size:
            return elapsed, f"{received} of {size} bytes"
        if digest is not None and digest.hexdigest() != check:
            return elapsed, "the body does not hash to the digest"
        return elapsed, None
    except (OSError, http.client.HTTPException) as exc:
        return time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def _clients(port: int, setup: dict[str, Any], devices: list[int], signals: Any) -> None:
    """Run one thread per device in this process, all released by the ``go`` event."""
    ready, go, out = signals
    from edge_runtime.tls import pinned_client_context
    from secure_agg.identity import EnrolmentAuthority
    from secure_agg.randomness import DeterministicRandom
    from secure_agg.request_auth import authorization_header

    context = pinned_client_context(Path(setup["ca"]).read_bytes())
    authority = EnrolmentAuthority.generate(DeterministicRandom(_AUTHORITY_SEED))
    target = f"/v1/objects/{setup['digest']}"
    now = int(time.time())
    headers = [
        authorization_header(
            authority.enrol(f"device-{index}", DeterministicRandom(10_000 + index)),
            method="GET",
            target=target,
            timestamp=now,
        )
        for index in devices
    ]
    results: list[tuple[float, str | None]] = [(0.0, None)] * len(devices)
    release = threading.Event()

    def device(slot: int) -> None:
        release.wait()
        check = setup["digest"] if slot == 0 else None  # one device per process hashes
        results[slot] = _fetch(
            port, target, headers[slot], context, size=setup["size"], check=check
        )

    threading.stack_size(512 * 1024)
    threads = [threading.Thread(target=device, args=(slot,)) for slot in range(len(devices))]
    for thread in threads:
        thread.start()
    ready.put(os.getpid())
    go.wait()
    release.set()
    for thread in threads:
        thread.join()
    out.put((time.time(), results))


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _run(variant: str, setup: dict[str, Any], devices: int, processes: int) -> dict[str, Any]:
    """One burst of ``devices`` downloads against a fresh ``variant`` server."""
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    server = context.Process(target=_serve, args=(variant, setup, child), daemon=True)
    server.start()
    message = parent.recv()
    if message[0] == "failed":
        server.join(10)
        raise RuntimeError(message[1])
    _, port, idle_rss = message
    ready, out, go = context.Queue(), context.Queue(), context.Event()
    shares = [list(range(devices))[k::processes] for k in range(processes)]
    clients = [
        context.Process(target=_clients, args=(port, setup, share, (ready, go, out)))
        for share in shares
        if share
    ]
    for process in clients:
        process.start()
    for _ in clients:
        ready.get(timeout=300)
    started = time.time()
    go.set()
    finished: list[float] = []
    outcomes: list[tuple[float, str | None]] = []
    for _ in clients:
        end, results = out.get(timeout=1800)
        finished.append(end)
        outcomes.extend(results)
    total = max(finished) - started
    for process in clients:
        process.join(60)
    parent.send("stop")
    message = parent.recv()
    server.join(60)
    if message[0] == "failed":
        raise RuntimeError(message[1])
    _, peak_rss, extras = message
    latencies = [latency for latency, _ in outcomes]
    errors = [error for _, error in outcomes if error is not None]
    return {
        "total_s": total,
        "mb_s": devices * setup["size"] / MB / total,
        "p50": _percentile(latencies, 0.50),
        "p95": _percentile(latencies, 0.95),
        "max": max(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:_MAX_SAMPLES],
        "peak_rss_mb": peak_rss,
        "idle_rss_mb": idle_rss,
        **extras,
    }


def _summarise(runs: list[dict[str, Any]], devices: int) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(float(statistics.median(run[key] for run in runs)), 4)

    totals = [run["total_s"] for run in runs]
    summary: dict[str, Any] = {
        "total_s": {
            "median": round(statistics.median(totals), 3),
            "min": round(min(totals), 3),
            "max": round(max(totals), 3),
        },
        "mb_s": round(statistics.median(run["mb_s"] for run in runs), 1),
        "latency_s": {"p50": median("p50"), "p95": median("p95"), "max": median("max")},
        "errors": sum(run["errors"] for run in runs),
        "error_samples": sorted({e for run in runs for e in run["error_samples"]})[:_MAX_SAMPLES],
        "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs), 1),
        "idle_rss_mb": round(max(run["idle_rss_mb"] for run in runs), 1),
        "runs": len(runs),
        "error": None,
    }
    if "audit_events" in runs[0]:
        summary["audit_events"] = [run["audit_events"] for run in runs]
        summary["audit_drain_s"] = median("audit_drain_s")
        summary["access_log_lines"] = [run["access_lines"] for run in runs]
        if any(events != devices for events in summary["audit_events"]):
            summary["error"] = f"expected {devices} store.downloaded events per run"
    return summary


def _failed(message: str) -> dict[str, Any]:
    return {
        "total_s": None,
        "mb_s": None,
        "latency_s": None,
        "errors": None,
        "error_samples": [],
        "peak_rss_mb": None,
        "idle_rss_mb": None,
        "runs": 0,
        "error": message,
    }


def _table(document: dict[str, Any]) -> str:
    rows = [
        f"{'variant':<8} {'total s':>8} {'MB/s':>8} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
        f"{'errors':>6} {'peak RSS MB':>11}"
    ]
    for name, result in document["variants"].items():
        if result["error"] is not None and result["total_s"] is None:
            rows.append(f"{name:<8} failed: {result['error']}")
            continue
        latency = result["latency_s"]
        rows.append(
            f"{name:<8} {result['total_s']['median']:>8.2f} {result['mb_s']:>8.1f} "
            f"{latency['p50']:>7.2f} {latency['p95']:>7.2f} {latency['max']:>7.2f} "
            f"{result['errors']:>6} {result['peak_rss_mb']:>11.1f}"
        )
    rows.append("ratios: " + ", ".join(f"{k} {v}" for k, v in document["ratios"].items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON document; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_serve", description=__doc__)
    parser.add_argument("--devices", type=int, default=1000, help="concurrent devices")
    parser.add_argument("--size-mb", type=float, default=4.0, help="the variant's size in MB")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument("--client-processes", type=int, default=2, help="processes of clients")
    parser.add_argument(
        "--quick", action="store_true", help="100 devices, 2 repeats (about a minute)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "store_serve.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.repeats = min(args.devices, 100), 2
    if args.devices < 1 or args.repeats < 1 or args.client_processes < 1 or args.size_mb <= 0:
        parser.error("--devices, --repeats, --client-processes and --size-mb must be positive")
    size = int(args.size_mb * MB)
    order = ("fedge", "plain")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-store-serve-") as tmp:
        setup = _prepare(Path(tmp), size)
        warm_up = min(args.devices, 20)
        for name in order:
            try:
                _run(name, setup, warm_up, args.client_processes)
            except Exception as exc:
                failures[name] = f"{type(exc).__name__}: {exc}"
        for repeat in range(args.repeats):
            for name in order if repeat % 2 == 0 else order[::-1]:
                if name in failures:
                    continue
                try:
                    result = _run(name, setup, args.devices, args.client_processes)
                except Exception as exc:
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    continue
                runs[name].append(result)
                print(
                    f"{name}: {result['total_s']:.2f} s, p95 {result['p95']:.2f} s, "
                    f"{result['errors']} errors, peak RSS {result['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    variants = {
        name: _summarise(runs[name], args.devices) if runs[name] else _failed(failures[name])
        for name in order
    }
    for name, message in failures.items():
        if runs[name]:
            variants[name]["error"] = message
    ratios: dict[str, float | None] = {}
    fedge, plain = variants["fedge"], variants["plain"]
    if fedge["total_s"] is not None and plain["total_s"] is not None:
        ratios = {
            "fedge_over_plain_total_s": round(
                fedge["total_s"]["median"] / plain["total_s"]["median"], 3
            ),
            "fedge_over_plain_mb_s": round(fedge["mb_s"] / plain["mb_s"], 3),
            "fedge_over_plain_p95": round(fedge["latency_s"]["p95"] / plain["latency_s"]["p95"], 3),
            "fedge_over_plain_peak_rss": round(fedge["peak_rss_mb"] / plain["peak_rss_mb"], 3),
        }
    document = {
        "benchmark": "store_serve",
        "machine": machine(),
        "parameters": {
            "devices": args.devices,
            "size_mb": args.size_mb,
            "repeats": args.repeats,
            "client_processes": args.client_processes,
            "quick": args.quick,
        },
        "variants": variants,
        "ratios": ratios,
        "benchmark_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write(args.out, document)
    print(_table(document))
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
