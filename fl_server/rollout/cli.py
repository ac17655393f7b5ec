"""``fedge rollout``: start, watch, promote, pause, resume and roll back canary rollouts.

Every command acts on the rollout state machine persisted in the fedge database
(:mod:`fl_server.rollout.controller`); ``fedge rollout run`` is the controller
loop that ingests device events and applies the gates. Read-only commands
(``status``) create nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge.errors import ConfigError
from fedge.home import FedgeHome
from fl_server.cli_options import DbUrlOption as _DbUrl
from fl_server.cli_options import HomeOption as _Home
from fl_server.cli_options import StoreDirOption as _StoreDir

if TYPE_CHECKING:
    from fl_server.rollout.controller import RolloutController
    from fl_server.rollout.plan import RolloutPlan
    from fl_server.rollout.records import RolloutStatus

__all__ = ["rollout_app"]

rollout_app = typer.Typer(
    help="Canary rollouts of signed model versions: stages, health gates, rollback.",
    no_args_is_help=True,
)

# Not the shared JsonOption ("instead of a table"): these commands print sentences.
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
_Rollout = Annotated[str, typer.Argument(help="The rollout's id (see `fedge rollout status`).")]
_Reason = Annotated[str | None, typer.Option("--reason", help="Recorded in the audit trail.")]


@contextmanager
def open_controller(
    db_url: str | None, store_dir: Path | None, home: Path | None
) -> Iterator[RolloutController]:
    """Open the controller on an existing store (nothing is created)."""
    from fl_server.audit import AuditLog
    from fl_server.events.store import EventStore
    from fl_server.rollout.controller import PRODUCTION, RolloutController
    from fl_server.store.cli import open_store
    from fl_server.store.release_policy import check_release, load_release_policy
    from fl_server.store.run_outcomes import AuditTrailOutcomes

    policy = load_release_policy(FedgeHome.resolve(home).root)
    with open_store(db_url, store_dir, home=home, create=False) as store:
        engine = store.engine

        def release_check(model: str, version: int) -> list[str]:
            # The same policy `fedge store tag production` applies: a rollout ends by
            # moving production, so it must not start on a version the policy refuses.
            return check_release(
                store, AuditTrailOutcomes(engine), model, PRODUCTION, version, policy
            )

        yield RolloutController(
            store, EventStore(engine), audit=AuditLog(engine), release_check=release_check
        )


def _plan(plan_file: Path | None, stages: str | None, bake_s: float | None) -> RolloutPlan:
    from fl_server.rollout.plan import RolloutPlan, load_plan

    plan = load_plan(plan_file) if plan_file is not None else RolloutPlan()
    document = plan.to_json()
    if stages is not None:
        try:
            document["stages"] = [float(part) / 100 for part in stages.split(",")]
        except ValueError:
            raise ConfigError(
                f"--stages takes percentages like 1,10,50,100, got {stages!r}"
            ) from None
    if bake_s is not None:
        document["bake_s"] = bake_s
    return RolloutPlan.from_json(document)


@rollout_app.command("start")
def start_command(
    model: Annotated[str, typer.Argument(help="The model's name in the store.")],
    version: Annotated[str, typer.Argument(help="The version to roll out (number or alias).")],
    plan_file: Annotated[
        Path | None,
        typer.Option("--plan", help="A TOML plan file with a [rollout] table (stages, gates)."),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option("--stages", help="Cohort percentages, e.g. 1,10,50,100 (must end at 100)."),
    ] = None,
    bake_s: Annotated[
        float | None, typer.Option("--bake", min=0, help="Seconds each stage bakes.")
    ] = None,
    reason: _Reason = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """Start rolling VERSION out from the production version, first stage only.

    The release policy is checked first; the first stage's signed directive is
    issued at once. Devices follow it when the controller loop (`fedge rollout run`)
    or the store server hands it out.
    """
    plan = _plan(plan_file, stages, bake_s)
    with open_controller(db_url, store_dir, home) as controller:
        record = controller.start(model, version, plan, reason=reason or "started by operator")
    if as_json:
        typer.echo(json.dumps(record.to_json(), indent=2))
        return
    typer.echo(
        f"rollout {record.id}: {model} v{record.version} replacing v{record.previous}, "
        f"stage 1 of {len(plan.stages)} at {100 * record.fraction:g} % "
        f"(bake {plan.bake_s:g} s per stage)"
    )


def _print_status(status: RolloutStatus) -> None:
    record = status.record
    stages = " -> ".join(
        f"[{100 * f:g}%]" if i == record.stage else f"{100 * f:g}%"
        for i, f in enumerate(record.plan.stages)
    )
    typer.echo(
        f"rollout {record.id}: {record.model} v{record.version} (from v{record.previous}) "
        f"{record.state.value}"
    )
    typer.echo(f"  stages: {stages}   bake left: {status.bake_left_s:.0f} s")
    typer.echo(
        f"  cohort: {status.expected_devices} expected, {status.target_devices} on "
        f"v{record.version} ({status.reporting_devices} reporting), "
        f"{status.control_devices} control on v{record.previous}"
        + (f", {status.malformed_events} malformed events" if status.malformed_events else "")
    )
    typer.echo(f"  gates: {status.verdict.value}")
    for gate in status.gates:
        value = "-" if gate.value is None else f"{gate.value:.4g}"
        limit = "" if gate.limit is None else f" (limit {gate.limit:.4g})"
        typer.echo(f"    {gate.verdict.value:<4} {gate.name}: {value}{limit}  {gate.detail}")
    if record.reason:
        typer.echo(f"  last: {record.reason}")


@rollout_app.command("status")
def status_command(
    rollout: Annotated[
        str | None, typer.Argument(help="A rollout id; none: list every rollout.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model's.")] = None,
    watch: Annotated[
        float | None,
        typer.Option("--watch", min=0.5, help="Refresh every N seconds until it ends (Ctrl-C)."),
    ] = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """Show rollouts, or one rollout's stages, gates and cohort health (live with --watch)."""
    from fl_server.rollout.state import RolloutState

    with open_controller(db_url, store_dir, home) as controller:
        if rollout is None:
            records = controller.rollouts(model)
            if as_json:
                typer.echo(json.dumps([r.to_json() for r in records], indent=2))
            elif not records:
                typer.echo("no rollouts")
            for record in [] if as_json else records:
                typer.echo(
                    f"{record.id:<28} {record.model:<16} v{record.version:<4} "
                    f"{record.state.value:<12} stage {record.stage + 1}/"
                    f"{len(record.plan.stages)} ({100 * record.fraction:g} %)"
                )
            return
        while True:
            status = controller.status(rollout)
            if as_json:
                typer.echo(json.dumps(status.to_json(), indent=2))
            else:
                _print_status(status)
            active = status.record.state in (RolloutState.RUNNING, RolloutState.PAUSED)
            if watch is None or not active:
                return
            time.sleep(watch)
            typer.echo("")


@rollout_app.command("promote")
def promote_command(
    rollout: _Rollout,
    force: Annotated[
        bool, typer.Option("--force", help="Promote even while a gate fails.")
    ] = False,
    reason: _Reason = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Move to the next stage now, without waiting for the bake time."""
    with open_controller(db_url, store_dir, home) as controller:
        record = controller.promote(rollout, reason or "promoted by operator", force=force)
    typer.echo(f"rollout {record.id}: {record.state.value}, {100 * record.fraction:g} %")


@rollout_app.command("pause")
def pause_command(
    rollout: _Rollout,
    reason: _Reason = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Stop automatic promotion and rollback; devices keep what they run."""
    with open_controller(db_url, store_dir, home) as controller:
        record = controller.pause(rollout, reason or "paused by operator")
    typer.echo(f"rollout {record.id}: paused at {100 * record.fraction:g} %")


@rollout_app.command("resume")
def resume_command(
    rollout: _Rollout,
    reason: _Reason = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Resume a paused rollout; its current stage bakes again from now."""
    with open_controller(db_url, store_dir, home) as controller:
        record = controller.resume(rollout, reason or "resumed by operator")
    typer.echo(f"rollout {record.id}: running at {100 * record.fraction:g} %")


@rollout_app.command("rollback")
def rollback_command(
    rollout: _Rollout,
    reason: _Reason = None,
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Send the whole fleet back to the previous production version (a signed rollback)."""
    with open_controller(db_url, store_dir, home) as controller:
        record = controller.rollback(rollout, reason or "rolled back by operator")
    typer.echo(
        f"rollout {record.id}: rolled back; every device returns to {record.model} "
        f"v{record.previous}"
    )


@rollout_app.command("run")
def run_command(
    authority_key: Annotated[
        str,
        typer.Option(
            "--authority-key",
            help="The enrolment authority's Ed25519 public key (64 hex digits): only its "
            "devices' signed events count.",
        ),
    ],
    broker: Annotated[
        str, typer.Option("--broker", help="The MQTT broker, HOST:PORT.")
    ] = "127.0.0.1:8883",
    ca_file: Annotated[
        Path | None, typer.Option("--ca", help="CA certificates the broker's must chain to.")
    ] = None,
    cert_file: Annotated[
        Path | None, typer.Option("--cert", help="This service's client certificate (PEM).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key", help="Its private key (PEM, 0600).")
    ] = None,
    username: Annotated[
        str | None, typer.Option("--username", help="The broker user name.")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="A file holding the password (0600).")
    ] = None,
    plaintext: Annotated[
        bool,
        typer.Option(
            "--plaintext", help="No TLS (only to a broker on this machine's loopback address)."
        ),
    ] = False,
    interval_s: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between gate checks.")
    ] = 5.0,
    drift_threshold: Annotated[
        float | None,
        typer.Option(
            "--drift-threshold",
            min=0.0,
            max=1.0,
            help="Request retraining (a retraining.requested audit event) when this share "
            "of the reporting fleet reports drift within an hour.",
        ),
    ] = None,
    topic_root: Annotated[
        str, typer.Option("--topic-root", help="The first level(s) of the MQTT topics.")
    ] = "fedge",
    db_url: _DbUrl = None,
    store_dir: _StoreDir = None,
    home: _Home = None,
) -> None:
    """Run the controller: ingest device events from MQTT, apply the gates, publish directives.

    Every new signed directive is published retained on <root>/models/<model>/directive;
    devices verify it themselves. Runs until SIGTERM or Ctrl-C.
    """
    import signal

    from edge_runtime.mqtt_config import MqttConfig, split_broker
    from fl_server.audit import AuditLog
    from fl_server.events.ingest import EventIngestor
    from fl_server.events.mqtt import MqttIngestService
    from fl_server.events.rejections import RejectionRecorder
    from fl_server.rollout.service import DirectivePublisher, RolloutService

    try:
        authority = bytes.fromhex(authority_key)
    except ValueError:
        authority = b""
    if len(authority) != 32:
        raise ConfigError("--authority-key must be 64 hex digits (an Ed25519 public key)")
    host, port = split_broker(broker)
    config = MqttConfig(
        host=host,
        port=port,
        tls=not plaintext,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        username=username,
        password_file=password_file,
        topic_root=topic_root,
        client_id=f"fedge-ingestor-{topic_root.replace('/', '-')}",
    )
    publisher = DirectivePublisher(
        config, client_id=f"fedge-rollout-{topic_root.replace('/', '-')}"
    )
    with open_controller(db_url, store_dir, home) as controller:
        controller.on_directive = publisher.publish
        engine = controller.engine
        audit = AuditLog(engine)
        trigger = None
        if drift_threshold is not None:
            from datetime import UTC, datetime, timedelta

            from edge_runtime.device_events import EventKind
            from fl_server.events.drift import DriftPolicy, DriftTrigger

            events = controller.events

            def population() -> int:
                # The fleet that reported in the last day: the drift share's denominator.
                since = datetime.now(UTC) - timedelta(days=1)
                return len(events.devices_reporting(EventKind.HEALTH, received_after=since))

            trigger = DriftTrigger(
                events, audit, policy=DriftPolicy(threshold=drift_threshold), population=population
            )
        ingestor = EventIngestor(
            controller.events,
            authority_public_key=authority,
            rejections=RejectionRecorder(audit),
            topic_root=config.topic_root,
            on_stored=None if trigger is None else trigger.observe,
        )
        service = RolloutService(
            controller, MqttIngestService(config, ingestor), interval_s=interval_s
        )
        signal.signal(signal.SIGTERM, lambda *_: service.stop())
        publisher.start()
        typer.echo(f"rollout controller: events and directives on {config.describe()}")
        try:
            service.run()
        except KeyboardInterrupt:
            service.stop()
        finally:
            publisher.close()
