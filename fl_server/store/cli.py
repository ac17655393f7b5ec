"""``fedge store``: list, show, verify, tag, export, gc and serve model versions; print the key.

The store is created by whatever publishes to it (``fedge sim run``, the
coordinator); these commands only open an existing one and fail with one line
when there is none, creating no database, directory or signing key.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.errors import ConfigError, FedgeError, StorageError
from fedge.home import FedgeHome, check_writable_directory, check_writable_file
from fl_server.cli_options import STORE_DIR_ENV, open_existing
from fl_server.cli_options import DbUrlOption as _DbUrl
from fl_server.cli_options import HomeOption as _Home
from fl_server.cli_options import JsonOption as _Json
from fl_server.cli_options import StoreDirOption as _StoreDir

if TYPE_CHECKING:
    from fl_server.store.run_outcomes import AuditTrailOutcomes
    from fl_server.store.store import ModelStore, ModelVersion

__all__ = ["STORE_DIR_ENV", "open_store", "store_app"]

_KEY_FILE = "store-key.pem"

store_app = typer.Typer(
    help="The model store: signed, versioned global models and their artefacts.",
    no_args_is_help=True,
)

_Model = Annotated[str, typer.Argument(help="The model's name.")]
_Ref = Annotated[str, typer.Argument(help="A version number, an alias, or 'latest'.")]


def _store_root(store_dir: Path | None, home: Path | None) -> Path:
    return store_dir or FedgeHome.resolve(home).store_dir


def _existing_key_path(root: Path) -> Path:
    """Return the signing key's path in ``root``; fail if there is none (never create one)."""
    path = root / _KEY_FILE
    if path.exists() and not path.is_file():
        raise StorageError(f"the store key {path} is not a file")
    if not path.exists():
        raise StorageError(
            f"no model store at {root} (no {_KEY_FILE}); run `fedge sim run` or "
            "`fedge server init` first"
        )
    return path


@contextmanager
def open_store(
    db_url: str | None,
    store_dir: Path | None,
    *,
    home: Path | None = None,
    create: bool = True,
) -> Iterator[ModelStore]:
    """Open the store (objects under ``store_dir``, its key in ``store_dir/store-key.pem``).

    Parameters
    ----------
    db_url, store_dir
        Explicit locations; ``None`` takes the fedge home's (``home``, else
        ``$FEDGE_HOME``, else ``~/.fedge``).
    create
        ``False``: the database and the signing key must exist already; nothing
        is created.

    Raises
    ------
    StorageError
        If ``create`` is ``False`` and there is no database or no key.
    """
    from fl_server.audit import AuditLog
    from fl_server.db import open_database
    from fl_server.store.blobs import FileBlobStore
    from fl_server.store.keys import StoreKey
    from fl_server.store.store import ModelStore

    root = _store_root(store_dir, home)
    engine = open_database(db_url or FedgeHome.resolve(home).db_url, create=create)
    try:
        key_path = root / _KEY_FILE if create else _existing_key_path(root)
        audit = AuditLog(engine)
        key = StoreKey.load_or_create(key_path, audit=audit if create else None)
        yield ModelStore(engine, FileBlobStore(root), key, audit=audit)
    finally:
        engine.dispose()


def _short_run(run_id: str | None) -> str:
    """Shorten a run id for a table (``20261127..9f3a1c``); ``--json`` has it whole."""
    if run_id is None:
        return "-"
    return run_id if len(run_id) <= 16 else f"{run_id[:8]}..{run_id[-6:]}"


def _version_row(
    version: ModelVersion, aliases: list[str], outcomes: AuditTrailOutcomes
) -> dict[str, Any]:
    """One version as ``store list --json`` prints it (read from the signed manifest)."""
    from fl_server.store.records import VersionInfo

    manifest = version.manifest
    info = VersionInfo.from_metadata(manifest.metadata)
    trail = None if info.run_id is None else outcomes.run_trail(info.run_id)
    return {
        "model": manifest.model,
        "version": manifest.version,
        "parent": manifest.parent,
        "run_id": info.run_id,
        "run_outcome": None if trail is None else trail.outcome.value,
        "run_trail_problem": None if trail is None else trail.problem,
        "server_round": info.server_round,
        "accuracy": info.accuracy,
        "dp_mode": None if info.dp_mode is None else info.dp_mode.value,
        "dp_epsilon": info.dp_epsilon,
        "artefacts": [a.name for a in version.offered()],
        "aliases": sorted(aliases),
    }


def _cell_text(value: object, width: int, fmt: str = "") -> str:
    text = "-" if value is None else format(value, fmt)
    return f"{text:>{width}}" if fmt else f"{text:<{width}}"


@store_app.command("list")
def list_command(
    model: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """One line per version: model, version, parent, run, round, accuracy, DP, artefacts.

    Columns: model, version, parent, the run that published it (shortened; --json has
    the whole id), its round, its accuracy, its DP mode (off, central, distributed,
    local, sample; - if unknown) and epsilon, how its run ended by the audit trail
    (completed, failed, interrupted, running, unknown; - for a version published by
    hand), its offered artefacts and the aliases on it. Everything is read from the
    signed manifests and the audit trail; nothing is written.
    """
    from fl_server.store.run_outcomes import AuditTrailOutcomes

    with open_store(db_url, store_dir, home=home, create=False) as store:
        versions = store.versions(model)
        aliases: dict[tuple[str, int], list[str]] = {}
        for name in {v.manifest.model for v in versions}:
            for alias, number in store.aliases(name).items():
                aliases.setdefault((name, number), []).append(alias)
        engine = open_existing(db_url, home)
        try:
            outcomes = AuditTrailOutcomes(engine)
            rows = [
                _version_row(v, aliases.get((v.manifest.model, v.manifest.version), []), outcomes)
                for v in versions
            ]
        finally:
            engine.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no versions stored")
        return
    typer.echo(
        f"{'model':<16} {'ver':>4} {'parent':>6} {'run':<16} {'round':>5} {'accuracy':>8} "
        f"{'dp':<11} {'epsilon':>8} {'outcome':<12} artefacts"
    )
    damaged: list[str] = []
    for row in rows:
        outcome = row["run_outcome"]
        if row["run_trail_problem"] is not None:
            outcome = f"{outcome}*"
            damaged.append(f"run {row['run_id']}: {row['run_trail_problem']}")
        typer.echo(
            f"{row['model']:<16} {row['version']:>4} {_cell_text(row['parent'], 6, 'd')} "
            f"{_short_run(row['run_id']):<16} {_cell_text(row['server_round'], 5, 'd')} "
            f"{_cell_text(row['accuracy'], 8, '.4f')} {_cell_text(row['dp_mode'], 11)} "
            f"{_cell_text(row['dp_epsilon'], 8, '.3f')} {_cell_text(outcome, 12)} "
            + ", ".join(row["artefacts"])
            + (f"  [{', '.join(row['aliases'])}]" if row["aliases"] else "")
        )
    for line in sorted(set(damaged)):
        typer.echo(f"* the audit trail of {line}")


@store_app.command("show")
def show_command(
    model: _Model,
    ref: _Ref = "latest",
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Print a version's signed manifest, the status and quality of each artefact."""
    with open_store(db_url, store_dir, home=home, create=False) as store:
        version = store.get(model, ref)
    document = {
        **version.signed.to_json(),
        "artefact_status": dict(version.statuses),
        "artefact_quality": {k: dict(v) for k, v in version.quality.items()},
    }
    typer.echo(json.dumps(document, indent=2, sort_keys=True))


def _cell(quality: dict[str, float], key: str, width: int, digits: int) -> str:
    return f"{quality[key]:>{width}.{digits}f}" if key in quality else f"{'-':>{width}}"


@store_app.command("variants")
def variants_command(
    model: _Model,
    ref: _Ref = "latest",
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """Print a version's artefacts: precision, status, size, accuracy, agreement, p50."""
    with open_store(db_url, store_dir, home=home, create=False) as store:
        version = store.get(model, ref)
    if as_json:
        document = {
            "model": model,
            "version": version.manifest.version,
            "artefacts": [
                {
                    "name": entry.name,
                    "precision": entry.precision.value,
                    "status": version.statuses[entry.name],
                    "size": entry.size,
                    "quality": dict(version.quality.get(entry.name, {})),
                }
                for entry in version.manifest.artefacts
            ],
        }
        typer.echo(json.dumps(document, indent=2))
        return
    typer.echo(f"{model} v{version.manifest.version}")
    typer.echo(
        f"{'artefact':<26} {'precision':<9} {'status':<9} {'KB':>8} {'accuracy':>8} "
        f"{'agree':>6} {'p50 ms':>7}"
    )
    for entry in version.manifest.artefacts:
        quality = dict(version.quality.get(entry.name, {}))
        cell = functools.partial(_cell, quality)
        typer.echo(
            f"{entry.name:<26} {entry.precision.value:<9} {version.statuses[entry.name]:<9} "
            f"{entry.size / 1024:>8.1f} {cell('accuracy', 8, 4)} {cell('agreement', 6, 3)} "
            f"{cell('p50_ms', 7, 3)}"
        )


@store_app.command("diff")
def diff_command(
    model: _Model,
    a: Annotated[str, typer.Argument(help="The first version (number, alias or latest).")],
    b: Annotated[str, typer.Argument(help="The second version.")],
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Print what differs between two versions: metadata and artefact digests (JSON)."""
    with open_store(db_url, store_dir, home=home, create=False) as store:
        difference = store.diff(model, a, b)
    typer.echo(json.dumps(difference, indent=2, sort_keys=True))


@store_app.command("verify")
def verify_command(
    model: _Model,
    ref: _Ref = "latest",
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Check the manifest's signature and re-hash every artefact; exit 1 on any failure."""
    with open_store(db_url, store_dir, home=home, create=False) as store:
        report = store.verify(model, ref)
    typer.echo(f"{model} v{report.version}: signature {'ok' if report.signature_ok else 'BAD'}")
    if report.problem is not None:
        typer.echo(f"  {report.problem}")
    for name, status in report.artefacts.items():
        typer.echo(f"  {name}: {status}")
    if not report.ok:
        raise StorageError(f"{model} v{report.version} did not verify")


@store_app.command("tag")
def tag_command(
    model: _Model,
    alias: Annotated[str, typer.Argument(help="The alias to move (production, canary, ...).")],
    ref: _Ref,
    override: Annotated[
        str | None,
        typer.Option(
            "--override",
            help="Move a protected alias although the release policy refuses; the reason "
            "and the refusals are recorded in the audit trail (store.alias_moved).",
        ),
    ] = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Point an alias at a version, atomically; a protected alias only as the policy allows.

    Protected aliases (production and canary unless HOME/release-policy.toml says
    otherwise) move only to a version of a completed run, never round 0, never a
    non-private version over a private one, not below the current accuracy, and
    within the policy's epsilon bound (docs/model-store.md). A refusal exits 1 with
    every reason, leaves the alias unchanged and is recorded (store.release_refused).
    """
    from fl_server.audit import AuditLog
    from fl_server.store.release_policy import ReleaseRefused, load_release_policy, release
    from fl_server.store.run_outcomes import AuditTrailOutcomes

    policy = load_release_policy(FedgeHome.resolve(home).root)
    with open_store(db_url, store_dir, home=home, create=False) as store:
        version = store.resolve(model, ref)
        engine = open_existing(db_url, home)
        try:
            done = release(
                store,
                audit_log=AuditLog(engine),
                outcomes=AuditTrailOutcomes(engine),
                model=model,
                alias=alias,
                version=version,
                policy=policy,
                override=override,
            )
        except ReleaseRefused as exc:
            # Recorded already (store.release_refused); one line, with the way out.
            raise FedgeError(f"{exc} (--override REASON moves it anyway)") from None
        finally:
            engine.dispose()
    moved = "" if done.previous is None else f" (was v{done.previous})"
    typer.echo(f"{model} {alias} -> v{version}{moved}")
    if done.overridden:
        typer.echo(f"release policy overridden ({'; '.join(done.overridden)}): {override}")


@store_app.command("export")
def export_command(
    model: _Model,
    ref: _Ref,
    destination: Annotated[Path, typer.Argument(help="A directory to write the artefacts to.")],
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Write a version's offered artefacts (verified) and its signed manifest to a directory."""
    from edge_runtime.durable import write_atomically

    check_writable_directory(destination, option="DESTINATION")
    with open_store(db_url, store_dir, home=home, create=False) as store:
        # The signature, the index against it and every object are checked before the
        # first byte is written: a bundle is handed out whole and verified, or not at all.
        version = store.get(model, ref)
        report = store.verify(model, version.manifest.version)
        if not report.ok:
            bad = {k: v for k, v in report.artefacts.items() if v != "ok"}
            raise StorageError(
                f"{model} v{report.version} did not verify ({report.problem or bad}); "
                "nothing exported"
            )
        document = json.dumps(version.signed.to_json(), indent=2, sort_keys=True) + "\n"
        try:
            destination.mkdir(parents=True, exist_ok=True)
            for entry in version.offered():
                store.blobs.export(entry.digest, destination / entry.name)
            write_atomically(destination / "manifest.json", document.encode())
        except OSError as exc:
            raise StorageError(f"cannot write to {destination}: {exc}") from exc
    typer.echo(f"{model} v{version.manifest.version} -> {destination}")


@store_app.command("key")
def key_command(
    store_dir: _StoreDir = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also write the public key (64 hex digits) to this file."),
    ] = None,
    home: _Home = None,
) -> None:
    """Print the store's public signing key: the trust anchor devices verify manifests with.

    Only the public half is printed; the private key never leaves store-key.pem.
    The key is made by whatever first publishes to the store; this never makes one.
    """
    from fl_server.store.keys import StoreKey

    if out is not None:
        check_writable_file(out, option="--out")
    key = StoreKey.load_or_create(_existing_key_path(_store_root(store_dir, home)))
    public = key.public_key_bytes().hex()
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(public + "\n")
        except OSError as exc:
            raise StorageError(f"cannot write --out {out}: {exc}") from exc
    typer.echo(f"{public}  (key id {key.key_id})")


@store_app.command("gc")
def gc_command(
    keep_last: Annotated[
        int, typer.Option("--keep-last", min=1, help="Versions of each model to keep.")
    ] = 10,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count.")] = False,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Delete versions beyond the newest N (aliased ones stay), then unreferenced files.

    Objects no version references and temporary files of abandoned writes go once
    they are an hour old.
    """
    with open_store(db_url, store_dir, home=home, create=False) as store:
        counts = store.gc(keep_last=keep_last, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"{verb} {counts['versions_deleted']} versions, {counts['objects_deleted']} objects "
        f"and {counts['temporaries_deleted']} stale temporary files"
    )


@store_app.command("serve")
def serve_command(
    tls_cert: Annotated[Path, typer.Option("--tls-cert", help="The server's PEM certificate.")],
    tls_key: Annotated[Path, typer.Option("--tls-key", help="The server's PEM private key.")],
    authority_key: Annotated[
        str,
        typer.Option(
            "--authority-key",
            help="The enrolment authority's Ed25519 public key (64 hex digits): its devices "
            "may fetch.",
        ),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port.")] = 8443,
    access_log: Annotated[
        Path | None,
        typer.Option(
            "--access-log",
            help="Append one line per request here (default: HOME/logs/store-access.log).",
        ),
    ] = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Serve signed manifests and artefacts to enrolled devices over HTTPS until Ctrl-C.

    GET /v1/models/MODEL/manifest?ref=REF, /v1/objects/SHA256 (Range, ETag), each
    signed by a device certified by --authority-key; GET or HEAD /v1/health unsigned.
    Every request is appended to the access log (never its headers or signature), and
    every completed download is recorded in the audit trail (store.downloaded).
    """
    from fl_server.store.serve import StoreServer, tls_context

    try:
        authority = bytes.fromhex(authority_key)
    except ValueError:
        authority = b""
    if len(authority) != 32:
        raise ConfigError("--authority-key must be 64 hex digits (an Ed25519 public key)")
    log_path = access_log or FedgeHome.resolve(home).root / "logs" / "store-access.log"
    check_writable_file(log_path, option="--access-log")
    context = tls_context(tls_cert, tls_key)
    with open_store(db_url, store_dir, home=home, create=False) as store:
        server = StoreServer(
            store,
            authority_public_key=authority,
            tls=context,
            host=host,
            port=port,
            access_log=log_path,
        )
        typer.echo(
            f"serving the model store on https://{host}:{server.port} (Ctrl-C stops); "
            f"access log {log_path}"
        )
        with server:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                typer.echo("stopped")
