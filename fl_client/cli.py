"""``fedge client``: an edge device's model cache and local inference.

- ``fedge client models list|install|sync|rollback``: the verified local model
  cache (:class:`edge_runtime.cache.ModelCache`); ``install`` takes a bundle
  written by ``fedge store export`` (sideloading, e.g. for air-gapped devices),
  ``sync`` fetches from ``fedge store serve`` over HTTPS with the device's
  enrolled identity (:func:`fl_client.model_sync.sync_model`); both verify the
  signature with the store's public key (``fedge store key``) and every byte
  against it, and report what they did (installed, re-activated from the cache,
  already current) and the version kept for rollback.
- ``fedge client infer``: run the current model on images, report the provider
  really used, accuracy (with labels), latency percentiles, input drift against
  the reference shipped with the model, and what the edge filter would send.
- ``fedge client serve``: the local inference server on the current model.
- ``fedge client ledger``: what each device's own lifetime privacy ledger says
  it has spent, and the rounds it refused and why (read-only).

The cache and the devices' directory default to the fedge home's
(:mod:`fedge.home`); listings take ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.errors import ConfigError, DataError, StorageError
from fedge.home import HOME_HELP, FedgeHome, resolve_home
from fl_client.deploy_cli import enroll_command, start_command

if TYPE_CHECKING:
    import numpy as np

    from edge_runtime.cache import InstallReport, ModelCache
    from edge_runtime.manifest import Manifest, SignedManifest
    from edge_runtime.mqtt_config import MqttConfig
    from edge_runtime.mqtt_publisher import EventPublisher
    from fl_client.device_home import DeviceHome

__all__ = ["CACHE_DIR_ENV", "STORE_KEY_ENV", "STORE_URL_ENV", "client_app"]

CACHE_DIR_ENV = "FEDGE_CACHE_DIR"
STORE_KEY_ENV = "FEDGE_STORE_KEY"
STORE_URL_ENV = "FEDGE_STORE_URL"
_DRIFT_REFERENCE = "drift-reference.json"

client_app = typer.Typer(
    help="An edge device: enrol, start, its verified model cache and local inference.",
    no_args_is_help=True,
)
client_app.command("enroll")(enroll_command)
client_app.command("start")(start_command)
models_app = typer.Typer(
    help="The device's model cache: list, install or sync (verified), roll back.",
    no_args_is_help=True,
)
client_app.add_typer(models_app, name="models")

_CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar=CACHE_DIR_ENV,
        help="The model cache (default: HOME/client/cache).",
    ),
]
_Home = Annotated[Path | None, typer.Option("--home", help=HOME_HELP)]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_StoreKey = Annotated[
    str,
    typer.Option(
        "--store-key",
        envvar=STORE_KEY_ENV,
        help="The store's Ed25519 public key: 64 hex digits, or a file holding them "
        "(`fedge store key --out FILE`).",
    ),
]
_StoreUrl = Annotated[
    str | None,
    typer.Option(
        "--store-url",
        envvar=STORE_URL_ENV,
        help="https://host:port of `fedge store serve` (may differ from the gateway).",
    ),
]
_DeviceDir = Annotated[
    Path | None,
    typer.Option("--device-dir", help="The device's enrolment state (default: HOME/device)."),
]
_Model = Annotated[str, typer.Argument(help="The model's name.")]
_AllowDowngrade = Annotated[
    bool, typer.Option("--allow-downgrade", help="Accept a version older than the current.")
]


def _trusted_key(value: str) -> bytes:
    text = value.strip()
    candidate = Path(text)
    if len(text) != 64 and candidate.is_dir():
        raise ConfigError(f"--store-key {text} is a directory; give 64 hex digits or a file")
    if len(text) != 64 and candidate.is_file():
        try:
            text = next(iter(candidate.read_text().split()), "")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --store-key {candidate}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError("--store-key must be 64 hex digits or a file holding them")
    return key


def _cache_dir(cache_dir: Path | None, home: Path | None) -> Path:
    return cache_dir or FedgeHome.resolve(home).cache_dir


def _device_dir(device_dir: Path | None, home: Path | None) -> Path:
    return device_dir or resolve_home(home) / "device"


def _store_url(store_url: str | None) -> str:
    if not store_url:
        raise ConfigError(f"give the model store's URL with --store-url or ${STORE_URL_ENV}")
    return store_url


def _cache(cache_dir: Path | None, store_key: str, home: Path | None) -> ModelCache:
    from edge_runtime.cache import ModelCache

    return ModelCache(_cache_dir(cache_dir, home), trusted_key=_trusted_key(store_key))


@models_app.command("list")
def list_command(
    store_key: _StoreKey,
    cache_dir: _CacheDir = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """List each model's current version (re-verified) and the versions kept for rollback."""
    root = _cache_dir(cache_dir, home)
    trusted = _trusted_key(store_key)
    rows: list[dict[str, Any]] = []
    if root.is_dir():  # an absent cache is listed as empty, not created
        cache = _cache(cache_dir, trusted.hex(), home)
        for model in cache.models():
            current = cache.current(model)
            if current is None:
                continue
            rows.append(
                {
                    "model": model,
                    "version": current.version,
                    "artefact": current.artefact,
                    "precision": current.entry.precision.value,
                    "kept": list(cache.versions(model)),
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models installed in {root}")
        return
    typer.echo(f"{'model':12} {'current':>7}  {'artefact':26} {'precision':9}  kept")
    for row in rows:
        kept = ", ".join(f"v{v}" for v in row["kept"])
        typer.echo(
            f"{row['model']:12} {'v' + str(row['version']):>7}  {row['artefact']:26} "
            f"{row['precision']:9}  {kept}"
        )


def _read_bundle(bundle: Path) -> SignedManifest:
    """Parse a bundle's signed manifest (its signature is checked on install)."""
    from edge_runtime.manifest import SignedManifest

    hint = "write one with `fedge store export`"
    if not bundle.is_dir():
        what = "does not exist" if not bundle.exists() else "is not a directory"
        raise DataError(f"bundle {bundle} {what} ({hint})")
    path = bundle / "manifest.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{bundle} has no manifest.json ({hint})") from None
    except RecursionError:
        raise ConfigError(f"{path} is not a signed manifest: nested too deeply") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not a signed manifest: {exc}") from exc
    try:
        return SignedManifest.from_json(document)
    except RecursionError:
        raise ConfigError(f"{path} is not a signed manifest: nested too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a signed manifest: {exc}") from exc


def _bundle_choice(manifest: Manifest, bundle: Path, artefact: str | None) -> tuple[str, list[str]]:
    """Choose the model and its companions among the bundle's files the signed offer allows."""
    from edge_runtime.fetch import COMPANIONS, DEFAULT_PREFER
    from edge_runtime.manifest import offered_names

    names = [a.name for a in manifest.artefacts if (bundle / a.name).is_file()]
    offered = offered_names(manifest)
    where = f"the signed manifest of {manifest.model} v{manifest.version}"
    if offered is not None:
        if artefact is not None and artefact not in offered:
            from edge_runtime.cache import ModelRejected

            listed = any(a.name == artefact for a in manifest.artefacts)
            status = "rejected by" if listed else "not in"
            raise ModelRejected(f"{artefact} is {status} {where} (offered: {', '.join(offered)})")
        names = [n for n in names if n in offered]
    choice = artefact or next((n for n in DEFAULT_PREFER if n in names), None)
    if choice is None or choice not in names:
        raise ConfigError(f"{bundle} holds none of {artefact or DEFAULT_PREFER}; it has {names}")
    return choice, [c for c in COMPANIONS if c in names and c != choice]


def _print_report(lines: list[str], document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(document, indent=2))
    else:
        for line in lines:
            typer.echo(line)


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
            help="Which artefact to serve [default: INT8 static if offered, else FP32 ONNX]; "
            "one the signed manifest rejects is refused.",
        ),
    ] = None,
    allow_downgrade: _AllowDowngrade = False,
    cache_dir: _CacheDir = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """Verify a bundle's signed manifest and every byte, install it and make it current.

    The drift reference shipped with the version (drift-reference.json) is installed
    with it. Reports whether the version was newly installed, re-activated from the
    cache or already current, the bytes verified, and the version kept for rollback.
    A bundle that does not verify changes nothing.
    """
    from edge_runtime.cache import ModelRejected
    from edge_runtime.manifest import ManifestInvalid, verify_manifest

    trusted = _trusted_key(store_key)
    signed = _read_bundle(bundle)
    try:  # before anything is chosen: the offer is read from a verified manifest only
        manifest = verify_manifest(signed, trusted)
    except ManifestInvalid as exc:
        raise ModelRejected(f"refusing {bundle}: {exc}") from exc
    choice, companions = _bundle_choice(manifest, bundle, artefact)
    report: InstallReport = _cache(cache_dir, store_key, home).install(
        signed,
        choice,
        bundle / choice,
        companions={name: bundle / name for name in companions},
        allow_downgrade=allow_downgrade,
    )
    _print_report(report.summary(), report.to_json(), as_json)


@models_app.command("sync")
def sync_command(
    model: _Model,
    store_key: _StoreKey,
    store_url: _StoreUrl = None,
    ref: Annotated[
        str,
        typer.Option(
            "--ref", help="A version number, an alias (e.g. production) or latest (the newest)."
        ),
    ] = "latest",
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca", help="The store's TLS CA (default: the CA pinned at enrolment, DIR/ca.pem)."
        ),
    ] = None,
    device_dir: _DeviceDir = None,
    prefer: Annotated[
        str | None,
        typer.Option(
            "--prefer",
            help="Artefact names in order of preference, comma-separated "
            "[default: model-int8-static.onnx,model-fp32.onnx].",
        ),
    ] = None,
    allow_downgrade: _AllowDowngrade = False,
    cache_dir: _CacheDir = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """Fetch MODEL from the model store over HTTPS as this enrolled device, verify, install.

    Every request is signed with the device's enrolled identity; the manifest must
    verify with --store-key and every byte with the manifest. Reports what was
    downloaded, whether the version was newly installed, re-activated from the cache
    or already current, and the version kept for rollback. A refusal changes nothing.
    """
    from edge_runtime.fetch import DEFAULT_PREFER
    from fl_client.model_sync import SyncConfig, sync_model

    url = _store_url(store_url)
    order = DEFAULT_PREFER if prefer is None else tuple(n.strip() for n in prefer.split(","))
    config = SyncConfig(
        model=model,
        store_url=url,
        store_key=_trusted_key(store_key),
        device_dir=_device_dir(device_dir, home),
        cache_dir=_cache_dir(cache_dir, home),
        ref=ref,
        ca_file=ca,
        prefer=order,
        allow_downgrade=allow_downgrade,
    )
    result = sync_model(config)
    _print_report(result.summary(), result.to_json(), as_json)


@models_app.command("follow")
def follow_command(
    model: _Model,
    store_key: _StoreKey,
    store_url: _StoreUrl = None,
    broker: Annotated[
        str, typer.Option("--broker", help="The MQTT broker, HOST:PORT.")
    ] = "127.0.0.1:8883",
    broker_ca: Annotated[
        Path | None,
        typer.Option("--broker-ca", help="The broker's TLS CA (default: the pinned CA)."),
    ] = None,
    broker_cert: Annotated[
        Path | None, typer.Option("--broker-cert", help="This device's broker certificate.")
    ] = None,
    broker_key: Annotated[
        Path | None, typer.Option("--broker-key", help="Its private key (0600).")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="The device's broker password (0600)."),
    ] = None,
    plaintext: Annotated[
        bool,
        typer.Option("--plaintext", help="No TLS (only to a broker on a loopback address)."),
    ] = False,
    topic_root: Annotated[
        str, typer.Option("--topic-root", help="The first level(s) of the MQTT topics.")
    ] = "fedge",
    opt_out: Annotated[
        bool,
        typer.Option("--opt-out", help="Decline canary stages; follow fleet-wide ones only."),
    ] = False,
    device_class: Annotated[
        str | None,
        typer.Option(
            "--device-class",
            help="This device's class as `fedge edge profile` measured it: install the "
            "variant the rollout chose for it.",
        ),
    ] = None,
    device_dir: _DeviceDir = None,
    cache_dir: _CacheDir = None,
    home: _Home = None,
) -> None:
    """Follow MODEL's canary rollouts: act on signed directives, fetch, swap, report.

    Subscribes to the retained directive of MODEL on the broker; each directive is
    checked by the device itself (the store key's signature, a newer sequence, its own
    sticky cohort, never backwards unless a signed rollback names the version), the
    version is fetched over HTTPS as the enrolled device and swapped in, and a signed
    model_installed event is published. Runs until SIGTERM or Ctrl-C.
    """
    import signal
    import threading

    from edge_runtime.cache import ModelCache
    from edge_runtime.mqtt_config import directive_topic, mqtt_client
    from edge_runtime.mqtt_publisher import EventPublisher
    from fl_client.device_home import DeviceHome
    from fl_client.model_sync import SyncConfig
    from fl_client.rollout_agent import RolloutAgent

    url = _store_url(store_url)
    directory = _device_dir(device_dir, home)
    device_home = DeviceHome(directory)
    record = device_home.require_enrolled()
    key = _trusted_key(store_key)
    config = SyncConfig(
        model=model,
        store_url=url,
        store_key=key,
        device_dir=directory,
        cache_dir=_cache_dir(cache_dir, home),
    )
    mqtt = _device_mqtt(
        broker,
        device_home,
        record.device_id,
        plaintext=plaintext,
        password_file=password_file,
        topic_root=topic_root,
        ca_file=broker_ca,
        cert_file=broker_cert,
        key_file=broker_key,
    )
    publisher = EventPublisher(mqtt, device_home.identity(), directory / "events")
    agent = RolloutAgent(
        config,
        device_id=record.device_id,
        opted_out=opt_out,
        device_class=device_class,
        report=publisher.emit,
    )
    cache = ModelCache(config.cache_dir, trusted_key=key)

    def current() -> int | None:
        installed = cache.current(model)
        return None if installed is None else installed.version

    listener = mqtt_client(mqtt, f"{record.device_id}-directives")
    listener.on_message = lambda client, userdata, message: agent.deliver(message.payload)
    listener.on_connect = lambda client, *args: client.subscribe(
        directive_topic(model, topic_root), qos=1
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    publisher.start()
    listener.connect_async(mqtt.host, mqtt.effective_port, keepalive=mqtt.keepalive_s)
    listener.loop_start()
    typer.echo(f"{record.device_id}: following {model} rollouts on {mqtt.describe()}")
    try:
        agent.run(current, stop)
    except KeyboardInterrupt:
        stop.set()
    finally:
        listener.disconnect()
        listener.loop_stop()
        publisher.close(drain_timeout_s=5.0)


@models_app.command("rollback")
def rollback_command(
    model: _Model,
    store_key: _StoreKey,
    to: Annotated[int | None, typer.Option("--to", min=1, help="A kept version.")] = None,
    cache_dir: _CacheDir = None,
    home: _Home = None,
) -> None:
    """Switch back to the previous kept version (or --to one): a pointer swap, instant."""
    installed = _cache(cache_dir, store_key, home).rollback(model, to)
    typer.echo(f"{model} -> v{installed.version} {installed.artefact}")


def _load_inputs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images (uint8 (N, 28, 28) or float (N, 1, 28, 28)) and optional labels."""
    import numpy as np

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
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # A truncated or corrupt archive fails in any of these, depending on where.
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


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Show only errors from the loggers ``names`` inside the block; restore their levels."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


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
    home: _Home = None,
) -> None:
    """Run the current model on the images one at a time: provider, accuracy, latency, drift."""
    import numpy as np

    from edge_runtime.drift import DriftConfig, DriftDetector
    from edge_runtime.drift_reference import ReferenceStats
    from edge_runtime.edge_filter import measure_egress
    from edge_runtime.predictor import Predictor
    from edge_runtime.providers import DEFAULT_PREFERENCE, ExecutionProvider

    # This command prints the provider fallback and the drift verdict itself (the levels
    # are restored afterwards: the command may run inside another program, or a test).
    with _quiet_loggers("edge_runtime.providers", "edge_runtime.drift"):
        images, labels = _load_inputs(inputs)  # bad input fails before the cache is opened
        cache = _cache(cache_dir, store_key, home)
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
    report_broker: Annotated[
        str | None,
        typer.Option(
            "--report-broker",
            help="HOST:PORT of the MQTT broker: publish signed health events (inferences, "
            "server errors, p95) for the rollout gates, as the enrolled device.",
        ),
    ] = None,
    report_interval_s: Annotated[
        float, typer.Option("--report-interval", min=1.0, help="Seconds between reports.")
    ] = 60.0,
    report_plaintext: Annotated[
        bool,
        typer.Option("--report-plaintext", help="No TLS to the broker (loopback only)."),
    ] = False,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="The device's broker password (0600)."),
    ] = None,
    topic_root: Annotated[
        str, typer.Option("--topic-root", help="The first level(s) of the MQTT topics.")
    ] = "fedge",
    device_dir: _DeviceDir = None,
    cache_dir: _CacheDir = None,
    home: _Home = None,
) -> None:
    """Serve the current model until Ctrl-C: POST /v1/predict, GET /v1/health, /v1/metrics.

    With --report-broker, a signed health event goes out every --report-interval
    (what was served since the last one), which the rollout gates read.
    """
    from edge_runtime.health_report import HealthReporter
    from edge_runtime.predictor import Predictor
    from edge_runtime.server import InferenceServer
    from edge_runtime.tls import tls_context

    installed = _cache(cache_dir, store_key, home).current(model)
    if installed is None:
        raise ConfigError(f"no {model} installed (see `fedge client models install`)")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = None if tls_cert is None or tls_key is None else tls_context(tls_cert, tls_key)
    predictor = Predictor(installed.path, model_id=f"{model}:v{installed.version}")
    publisher = None
    if report_broker is not None:
        publisher = _event_publisher(
            report_broker,
            plaintext=report_plaintext,
            password_file=password_file,
            topic_root=topic_root,
            device_dir=device_dir,
            home=home,
        )
    with InferenceServer(predictor, host=host, port=port, tls=tls) as server:
        reporter = None
        if publisher is not None:
            reporter = HealthReporter(
                server.metrics,
                model=model,
                version=installed.version,
                emit=publisher.emit,
                interval_s=report_interval_s,
            )
            publisher.start()
            reporter.start()
        typer.echo(f"serving {model} v{installed.version} on {server.url} (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("stopped")
        finally:
            if reporter is not None and publisher is not None:
                reporter.stop()
                publisher.close(drain_timeout_s=5.0)


def _event_publisher(
    broker: str,
    *,
    plaintext: bool,
    password_file: Path | None,
    topic_root: str,
    device_dir: Path | None,
    home: Path | None,
) -> EventPublisher:
    """Return the enrolled device's MQTT event publisher (durable outbox in its directory)."""
    from edge_runtime.mqtt_publisher import EventPublisher
    from fl_client.device_home import DeviceHome

    directory = _device_dir(device_dir, home)
    device_home = DeviceHome(directory)
    record = device_home.require_enrolled()
    config = _device_mqtt(
        broker,
        device_home,
        record.device_id,
        plaintext=plaintext,
        password_file=password_file,
        topic_root=topic_root,
        option="--report-broker",
    )
    return EventPublisher(config, device_home.identity(), directory / "events")


def _device_mqtt(
    broker: str,
    device_home: DeviceHome,
    device_id: str,
    *,
    plaintext: bool,
    password_file: Path | None,
    topic_root: str,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    option: str = "--broker",
) -> MqttConfig:
    """Return the enrolled device's broker settings: TLS to its pinned CA unless plaintext."""
    from edge_runtime.mqtt_config import MqttConfig, split_broker

    host, port = split_broker(broker, option)
    return MqttConfig(
        host=host,
        port=port,
        tls=not plaintext,
        ca_file=None if plaintext else (ca_file or device_home.ca_cert),
        cert_file=cert_file,
        key_file=key_file,
        username=device_id if password_file is not None else None,
        password_file=password_file,
        topic_root=topic_root,
    )


@client_app.command("ledger")
def ledger_command(
    devices_dir: Annotated[
        Path | None,
        typer.Option(
            "--devices-dir",
            help="The devices' directory (lifetime ledgers device-*.jsonl, refusal logs) "
            "(default: HOME/devices).",
        ),
    ] = None,
    delta: Annotated[float, typer.Option("--delta", help="The delta epsilon is stated at.")] = (
        1e-5
    ),
    accountant: Annotated[
        str, typer.Option("--accountant", help="rdp, or prv (tighter, for DP-SGD devices).")
    ] = "rdp",
    home: _Home = None,
    as_json: _Json = False,
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
    directory = devices_dir or FedgeHome.resolve(home).devices_dir
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise StorageError(
            f"no device ledgers: {directory} {what}; run `fedge sim run` first "
            "(or give --devices-dir)"
        )
    rows: list[dict[str, Any]] = []
    for path in sorted(directory.glob("device-*.jsonl")):
        name = path.stem.removeprefix("device-")
        ledger = ClientLedger(path)
        refusals = read_refusals(directory / f"refusals-{name}.jsonl")
        rows.append(
            {
                "device": name,
                "rounds": len(ledger.entries()),
                "epsilon": ledger.epsilon(delta, kind=kind),
                "delta": delta,
                "refused": len(refusals),
                "last_refusal": refusals[-1].get("reason") if refusals else None,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no device ledgers in {directory}")
        return
    for row in rows:
        line = (
            f"device {row['device']}: {row['rounds']} rounds, lifetime epsilon "
            f"{row['epsilon']:.3f} at delta {delta:g}"
        )
        if row["refused"]:
            line += f"; {row['refused']} refused, last: {row['last_refusal'] or '?'}"
        typer.echo(line)
