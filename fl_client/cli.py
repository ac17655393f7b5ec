"""``fedge client``: an edge device's model cache and local inference.

- ``fedge client models list|install|rollback``: the verified local model cache
  (:class:`edge_runtime.cache.ModelCache`); ``install`` takes a bundle written by
  ``fedge store export`` (sideloading, e.g. for air-gapped devices) and verifies
  its signature with the store's public key (``fedge store key``).
- ``fedge client infer``: run the current model on images, report the provider
  really used, accuracy (with labels), latency percentiles, input drift against
  the reference shipped with the model, and what the edge filter would send.
- ``fedge client serve``: the local inference server on the current model.
- ``fedge client ledger``: what each device's own lifetime privacy ledger says
  it has spent, and the rounds it refused and why (read-only).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from fedge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from edge_runtime.cache import ModelCache

__all__ = ["CACHE_DIR_ENV", "STORE_KEY_ENV", "client_app"]

CACHE_DIR_ENV = "FEDGE_CACHE_DIR"
STORE_KEY_ENV = "FEDGE_STORE_KEY"
_DEFAULT_CACHE = Path("runs/device/cache")
_DRIFT_REFERENCE = "drift-reference.json"

client_app = typer.Typer(
    help="An edge device: its verified model cache and local inference.", no_args_is_help=True
)
models_app = typer.Typer(
    help="The device's model cache: list, install (verified), roll back.", no_args_is_help=True
)
client_app.add_typer(models_app, name="models")

_CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", envvar=CACHE_DIR_ENV, help="The model cache [default: runs/device/cache]."
    ),
]
_StoreKey = Annotated[
    str,
    typer.Option(
        "--store-key",
        envvar=STORE_KEY_ENV,
        help="The store's Ed25519 public key: 64 hex digits, or a file holding them "
        "(`fedge store key --out FILE`).",
    ),
]
_Model = Annotated[str, typer.Argument(help="The model's name.")]


def _trusted_key(value: str) -> bytes:
    text = value.strip()
    candidate = Path(text)
    if len(text) != 64 and candidate.is_file():
        text = next(iter(candidate.read_text().split()), "")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError("--store-key must be 64 hex digits or a file holding them")
    return key


def _cache(cache_dir: Path | None, store_key: str) -> ModelCache:
    from edge_runtime.cache import ModelCache

    return ModelCache(cache_dir or _DEFAULT_CACHE, trusted_key=_trusted_key(store_key))


@models_app.command("list")
def list_command(store_key: _StoreKey, cache_dir: _CacheDir = None) -> None:
    """List each model's current version (re-verified) and the versions kept for rollback."""
    cache = _cache(cache_dir, store_key)
    models = cache.models()
    if not models:
        typer.echo(f"no models installed in {cache_dir or _DEFAULT_CACHE}")
        return
    typer.echo(f"{'model':12} {'current':>7}  {'artefact':26} {'precision':9}  kept")
    for model in models:
        current = cache.current(model)
        if current is None:
            continue
        kept = ", ".join(f"v{v}" for v in cache.versions(model))
        typer.echo(
            f"{model:12} {'v' + str(current.version):>7}  {current.artefact:26} "
            f"{current.entry.precision.value:9}  {kept}"
        )


@models_app.command("install")
def install_command(
    bundle: Annotated[
        Path, typer.Argument(help="A directory from `fedge store export`: manifest.json + files.")
    ],
    store_key: _StoreKey,
    artefact: Annotated[
        str | None,
        typer.Option(
            "--artefact",
            help="Which artefact to serve [default: INT8 static if present, else FP32 ONNX].",
        ),
    ] = None,
    allow_downgrade: Annotated[
        bool, typer.Option("--allow-downgrade", help="Accept a version older than the current.")
    ] = False,
    cache_dir: _CacheDir = None,
) -> None:
    """Verify a bundle's signed manifest and digests, then install it and make it current.

    The drift reference shipped with the version (drift-reference.json) is installed
    beside it. A bundle that does not verify changes nothing.
    """
    from edge_runtime.fetch import DEFAULT_PREFER
    from edge_runtime.manifest import SignedManifest

    cache = _cache(cache_dir, store_key)
    try:
        signed = SignedManifest.from_json(json.loads((bundle / "manifest.json").read_text()))
    except FileNotFoundError:
        raise DataError(
            f"{bundle} has no manifest.json (write one with `fedge store export`)"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{bundle / 'manifest.json'} is not a signed manifest: {exc}") from exc
    names = [a.name for a in signed.manifest.artefacts if (bundle / a.name).is_file()]
    choice = artefact or next((n for n in DEFAULT_PREFER if n in names), None)
    if choice is None or choice not in names:
        raise ConfigError(f"{bundle} holds none of {artefact or DEFAULT_PREFER}; it has {names}")
    if _DRIFT_REFERENCE in names:
        cache.stage(signed, _DRIFT_REFERENCE, bundle / _DRIFT_REFERENCE)
    installed = cache.install(signed, choice, bundle / choice, allow_downgrade=allow_downgrade)
    typer.echo(
        f"installed {installed.model} v{installed.version} {installed.artefact} "
        f"({installed.size:,} bytes, signature and SHA-256 verified)"
    )


@models_app.command("rollback")
def rollback_command(
    model: _Model,
    store_key: _StoreKey,
    to: Annotated[int | None, typer.Option("--to", min=1, help="A kept version.")] = None,
    cache_dir: _CacheDir = None,
) -> None:
    """Switch back to the previous kept version (or --to one): a pointer swap, instant."""
    installed = _cache(cache_dir, store_key).rollback(model, to)
    typer.echo(f"{model} -> v{installed.version} {installed.artefact}")


def _load_inputs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images (uint8 (N, 28, 28) or float (N, 1, 28, 28)) and optional labels."""
    labels: np.ndarray | None = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            images = loaded
        else:
            with loaded:
                if "images" not in loaded:
                    raise ConfigError(f"{path} has no 'images' array")
                images = loaded["images"]
                if "labels" in loaded:
                    labels = loaded["labels"]
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist (write held-out images with `fedge sim samples`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz or .npy: {exc}") from exc
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ConfigError(f"{path}: images must be (N, H, W) or (N, C, H, W), got {images.shape}")
    if labels is not None and labels.shape != (len(images),):
        raise ConfigError(f"{path}: {len(images)} images but labels of shape {labels.shape}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[:, None]
    return np.ascontiguousarray(images, dtype=np.float32), labels


@client_app.command("infer")
def infer_command(
    model: _Model,
    inputs: Annotated[
        Path,
        typer.Option("--input", help="An .npz with 'images' (and 'labels') or an .npy of images."),
    ],
    store_key: _StoreKey,
    provider: Annotated[
        str,
        typer.Option(
            "--provider",
            help="auto (TensorRT > CUDA > CPU), tensorrt, cuda or cpu; no silent "
            "fallback when one is named.",
        ),
    ] = "auto",
    threads: Annotated[int, typer.Option("--threads", min=1, help="ORT intra-op threads.")] = 1,
    cache_dir: _CacheDir = None,
) -> None:
    """Run the current model on the images one at a time: provider, accuracy, latency, drift."""
    from edge_runtime.drift import DriftConfig, DriftDetector
    from edge_runtime.drift_reference import ReferenceStats
    from edge_runtime.edge_filter import measure_egress
    from edge_runtime.predictor import Predictor
    from edge_runtime.providers import DEFAULT_PREFERENCE, ExecutionProvider

    # This command prints the provider fallback and the drift verdict itself.
    for name in ("edge_runtime.providers", "edge_runtime.drift"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cache = _cache(cache_dir, store_key)
    installed = cache.current(model)
    if installed is None:
        raise ConfigError(f"no {model} installed (see `fedge client models install`)")
    choices = {p.name.lower(): p for p in ExecutionProvider}
    if provider != "auto" and provider not in choices:
        raise ConfigError(f"--provider must be auto or one of {sorted(choices)}")
    required = None if provider == "auto" else choices[provider]
    predictor = Predictor(
        installed.path,
        model_id=f"{model}:v{installed.version}",
        preference=DEFAULT_PREFERENCE if required is None else (required,),
        require=required,
        intra_op_threads=threads,
    )
    images, labels = _load_inputs(inputs)
    started = time.perf_counter()
    logits = np.concatenate([predictor.predict(images[i : i + 1]) for i in range(len(images))])
    seconds = time.perf_counter() - started
    latency = predictor.latency.snapshot()
    typer.echo(
        f"{model} v{installed.version} {installed.artefact} on {predictor.provider.value}"
        + (f" ({predictor.fallback_reason})" if predictor.fallback_reason else "")
    )
    typer.echo(
        f"{len(images)} images in {seconds:.2f} s, batch 1: p50 {latency['p50_ms']:.3f} ms, "
        f"p95 {latency['p95_ms']:.3f} ms, p99 {latency['p99_ms']:.3f} ms"
    )
    if labels is not None:
        accuracy = float((logits.argmax(axis=1) == labels).mean())
        typer.echo(f"accuracy {accuracy:.4f} on {len(labels)} labelled images")
    reference_path = cache.companion(installed, _DRIFT_REFERENCE)
    if reference_path is None:
        typer.echo("drift: no reference shipped with this version")
    else:
        reference = ReferenceStats.from_bytes(reference_path.read_bytes())
        window = max(10, min(len(images), 500))
        report = DriftDetector(reference, DriftConfig(window=window)).evaluate(images[-window:])
        verdict = "DRIFT" if report.drifted else "no drift"
        typer.echo(
            f"drift: {verdict} over the last {window} inputs (KS max {report.ks_max:.3f}, "
            f"min p {report.min_p_value:.2g}, {len(report.features_flagged)} features flagged, "
            f"PSI max {report.psi_max:.3f})"
        )
    egress = measure_egress(images, logits)
    typer.echo(
        f"telemetry: {egress['events']} events, {egress['filtered_bytes']:,} bytes instead of "
        f"{egress['raw_bytes']:,} streamed raw ({egress['anomalies_forwarded']} anomalies)"
    )


@client_app.command("serve")
def serve_command(
    model: _Model,
    store_key: _StoreKey,
    host: Annotated[str, typer.Option("--host", help="Address (loopback without TLS).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8080,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    cache_dir: _CacheDir = None,
) -> None:
    """Serve the current model until Ctrl-C: POST /v1/predict, GET /v1/health, /v1/metrics."""
    from edge_runtime.predictor import Predictor
    from edge_runtime.server import InferenceServer
    from edge_runtime.tls import tls_context

    installed = _cache(cache_dir, store_key).current(model)
    if installed is None:
        raise ConfigError(f"no {model} installed (see `fedge client models install`)")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = None if tls_cert is None or tls_key is None else tls_context(tls_cert, tls_key)
    predictor = Predictor(installed.path, model_id=f"{model}:v{installed.version}")
    with InferenceServer(predictor, host=host, port=port, tls=tls) as server:
        typer.echo(f"serving {model} v{installed.version} on {server.url} (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("stopped")


@client_app.command("ledger")
def ledger_command(
    devices_dir: Annotated[
        Path,
        typer.Option(
            "--devices-dir",
            help="The devices' directory (lifetime ledgers device-*.jsonl, refusal logs).",
        ),
    ] = Path("runs/devices"),
    delta: Annotated[float, typer.Option("--delta", help="The delta epsilon is stated at.")] = (
        1e-5
    ),
    accountant: Annotated[
        str, typer.Option("--accountant", help="rdp, or prv (tighter, for DP-SGD devices).")
    ] = "rdp",
) -> None:
    """Show each device's lifetime epsilon from its own ledger, and what it refused (read-only)."""
    from fl_client.budget import ClientLedger
    from fl_client.refusals import read_refusals
    from strategies.accounting import AccountantKind

    try:
        kind = AccountantKind(accountant)
    except ValueError:
        raise ConfigError("--accountant must be rdp or prv") from None
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta}")
    ledgers = sorted(devices_dir.glob("device-*.jsonl")) if devices_dir.is_dir() else []
    if not ledgers:
        typer.echo(f"no device ledgers in {devices_dir}")
        return
    for path in ledgers:
        name = path.stem.removeprefix("device-")
        ledger = ClientLedger(path)
        rounds = len(ledger.entries())
        epsilon = ledger.epsilon(delta, kind=kind)
        refusals = read_refusals(devices_dir / f"refusals-{name}.jsonl")
        line = f"device {name}: {rounds} rounds, lifetime epsilon {epsilon:.3f} at delta {delta:g}"
        if refusals:
            last = refusals[-1]
            line += f"; {len(refusals)} refused, last: {last.get('reason', '?')}"
        typer.echo(line)
