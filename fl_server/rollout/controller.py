"""The rollout controller: a state machine persisted in the store's database.

One rollout moves one model version from the ``production`` alias's version to
the whole fleet in stages (:class:`~fl_server.rollout.plan.RolloutPlan`). Each
stage is a *signed release directive* (:mod:`edge_runtime.release`) naming the
cohort fraction; devices check it and their own sticky cohort bucket, fetch the
version, and report health over MQTT (:mod:`fl_server.events`). :meth:`tick`
reads those reports since the stage began and, per the gates, waits, promotes
to the next stage (after the bake time), completes (moves ``production``), or
rolls back (a signed rollback directive to the previous production version,
which every device follows; ``production`` never moved).

Everything is in the database: the rollout row, every directive and an audit
event per transition are written in one transaction, so a controller killed at
any point resumes where the database says (the bake timer included) and no
transition is half done. Moving the ``production`` alias happens before the
transition that records it and is idempotent, so a crash between the two is
repaired by the next tick.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edge_runtime.device_events import EventKind
from edge_runtime.release import (
    DirectiveKind,
    ReleaseDirective,
    SignedDirective,
    cohort_bucket,
    in_cohort,
)
from fedge.errors import ConfigError, StorageError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import ReleaseDirectiveRow, RolloutRow
from fl_server.events.store import EventStore
from fl_server.rollout.health import (
    HEALTH_KINDS,
    CohortHealth,
    GateResult,
    Verdict,
    collect,
    evaluate,
)
from fl_server.rollout.plan import RolloutPlan
from fl_server.rollout.records import RolloutRecord, RolloutStatus, record_of
from fl_server.rollout.state import RolloutState, Transition, check_transition
from fl_server.store.store import ModelStore

__all__ = ["PRODUCTION", "RolloutController"]

logger = logging.getLogger(__name__)

PRODUCTION = "production"
_ACTIVE = (RolloutState.RUNNING.value, RolloutState.PAUSED.value)
_ID = re.compile(r"[a-z0-9][a-z0-9\-]{0,63}")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class RolloutController:
    """Start, advance, pause and roll back rollouts; :meth:`tick` applies the gates.

    Parameters
    ----------
    store
        The model store (its database holds the rollouts, its key signs directives).
    events
        Where device events are ingested.
    audit
        Every transition is appended here, in the transition's transaction.
    clock
        Unix seconds (bake times, directive times).
    fleet
        Returns the device ids of the fleet (``None``: every device that sent a
        health event within ``fleet_window_s``).
    release_check
        Returns the reasons a version may not be released (the release policy);
        a rollout refused by it does not start.
    on_directive
        Called with every directive after its transaction committed (publishes it
        to the devices, e.g. as a retained MQTT message).
    """

    def __init__(
        self,
        store: ModelStore,
        events: EventStore,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
        fleet: Callable[[], Collection[str]] | None = None,
        fleet_window_s: float = 86_400.0,
        release_check: Callable[[str, int], list[str]] | None = None,
        on_directive: Callable[[SignedDirective], None] | None = None,
    ) -> None:
        self._store = store
        self._engine: Engine = events.engine
        self._events = events
        self._audit = audit
        self._clock = clock
        self._fleet = fleet
        self._fleet_window_s = fleet_window_s
        self._release_check = release_check
        self.on_directive = on_directive

    @property
    def engine(self) -> Engine:
        """The database the rollouts, directives and events live in."""
        return self._engine

    @property
    def events(self) -> EventStore:
        """Where the device events the gates read are stored."""
        return self._events

    # ----------------------------------------------------------------- reading

    def get(self, rollout_id: str) -> RolloutRecord:
        """Return one rollout."""
        try:
            with Session(self._engine) as session:
                row = session.get(RolloutRow, rollout_id)
                if row is None:
                    raise ConfigError(f"no rollout {rollout_id!r}")
                return record_of(row)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read rollouts: {exc}") from exc

    def rollouts(self, model: str | None = None) -> list[RolloutRecord]:
        """Return every rollout (of one model), newest first."""
        query = select(RolloutRow).order_by(RolloutRow.created_at.desc())
        if model is not None:
            query = query.where(RolloutRow.model == model)
        try:
            with Session(self._engine) as session:
                return [record_of(row) for row in session.scalars(query)]
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read rollouts: {exc}") from exc

    def directive(self, model: str) -> SignedDirective | None:
        """Return the newest signed directive of ``model`` (what its devices should run)."""
        query = (
            select(ReleaseDirectiveRow)
            .where(ReleaseDirectiveRow.model == model)
            .order_by(ReleaseDirectiveRow.sequence.desc())
            .limit(1)
        )
        try:
            with Session(self._engine) as session:
                row = session.scalars(query).first()
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read release directives: {exc}") from exc
        if row is None:
            return None
        return SignedDirective.from_json(json.loads(row.document))

    def status(self, rollout_id: str) -> RolloutStatus:
        """Return a rollout with its cohort's health and the gates' verdict now."""
        record = self.get(rollout_id)
        cohort, expected = self._cohort(record)
        verdict, gates = evaluate(
            record.plan.gates,
            cohort,
            expected_devices=expected,
            baseline_accuracy=self._baseline(record),
        )
        bake_left = max(0.0, record.stage_started_at + record.plan.bake_s - self._clock())
        return RolloutStatus(
            record=record,
            verdict=verdict,
            gates=gates,
            expected_devices=expected,
            target_devices=len(cohort.target),
            reporting_devices=sum(d.reported for d in cohort.target.values()),
            control_devices=len(cohort.control),
            malformed_events=cohort.malformed,
            bake_left_s=bake_left if record.state is RolloutState.RUNNING else 0.0,
            directive=self.directive(record.model),
        )

    # ------------------------------------------------------------ transitions

    def start(
        self, model: str, version: int | str, plan: RolloutPlan, *, reason: str = "started"
    ) -> RolloutRecord:
        """Start rolling ``version`` out from the current ``production`` version.

        Raises
        ------
        ConfigError
            If the version or ``production`` does not exist, the version is not newer,
            another rollout of the model is active, or the release policy refuses it.
        """
        number = self._store.resolve(model, version)
        previous = self._store.resolve(model, PRODUCTION)  # raises if there is none
        if number <= previous:
            raise ConfigError(
                f"{model} v{number} is not newer than production v{previous}: roll a fleet "
                "back with `fedge rollout rollback`, never by rolling out an older version"
            )
        self._store.get(model, number)  # the signed manifest and the index agree
        if self._release_check is not None:
            reasons = self._release_check(model, number)
            if reasons:
                raise ConfigError(
                    f"the release policy refuses {model} v{number}: " + "; ".join(reasons)
                )
        if plan.accuracy_floor is not None and not plan.variants:
            plan = replace(plan, variants=self.choose_variants(model, number, plan))
        stem = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40] or "model"
        rollout_id = f"{stem}-v{number}-{secrets.token_hex(3)}"
        assert _ID.fullmatch(rollout_id)
        now = self._clock()
        with Session(self._engine) as session, session.begin():
            active = session.scalars(
                select(RolloutRow.id).where(
                    RolloutRow.model == model, RolloutRow.state.in_(_ACTIVE)
                )
            ).first()
            if active is not None:
                raise ConfigError(f"rollout {active} of {model} is still active")
            row = RolloutRow(
                id=rollout_id,
                model=model,
                version=number,
                previous_version=previous,
                plan=json.dumps(plan.to_json(), sort_keys=True),
                state=RolloutState.RUNNING.value,
                stage=0,
                stage_started_at=now,
                created_at=_now_text(),
                updated_at=_now_text(),
                reason=reason,
            )
            session.add(row)
            session.flush()
            record = record_of(row)
            signed = self._issue(session, record, DirectiveKind.ROLLOUT, number, record.fraction)
            self._audit_in(
                session,
                AuditEventKind.ROLLOUT_STARTED,
                {
                    **self._payload(record, None, Transition.START, reason),
                    "plan": plan.to_json(),
                    "directive_sequence": signed.directive.sequence,
                },
            )
        self._published(signed)
        logger.info("rollout %s: %s v%d from v%d, stage 1 at %.0f %%", rollout_id, model,
                    number, previous, 100 * record.fraction)  # fmt: skip
        return record

    def choose_variants(self, model: str, version: int, plan: RolloutPlan) -> dict[str, str]:
        """Return, per device class, the variant of ``version`` the fleet should run.

        From each device's newest ``device_profile`` event (its measured latency of the
        offered variants): per class with enough devices, the fastest variant whose
        signed accuracy is at least ``plan.accuracy_floor``.
        """
        from fl_server.rollout.variants import variants_from_events

        assert plan.accuracy_floor is not None
        return variants_from_events(
            self._events,
            self._store.get(model, version).manifest,
            accuracy_floor=plan.accuracy_floor,
            min_devices=plan.gates.min_devices,
            since=datetime.fromtimestamp(self._clock() - self._fleet_window_s, UTC),
        )

    def pause(self, rollout_id: str, reason: str = "paused by operator") -> RolloutRecord:
        """Stop automatic moves (devices keep what they run)."""
        return self._move(rollout_id, Transition.PAUSE, reason)

    def resume(self, rollout_id: str, reason: str = "resumed by operator") -> RolloutRecord:
        """Resume a paused rollout; its stage bakes again from now."""
        return self._move(rollout_id, Transition.RESUME, reason)

    def promote(
        self, rollout_id: str, reason: str = "promoted by operator", *, force: bool = False
    ) -> RolloutRecord:
        """Move to the next stage now (no bake); refused while the gates fail unless forced."""
        if not force:
            status = self.status(rollout_id)
            if status.verdict is Verdict.FAIL:
                failing = [g.name for g in status.gates if g.verdict is Verdict.FAIL]
                raise ConfigError(
                    f"rollout {rollout_id} fails its gates ({', '.join(failing)}); "
                    "roll it back, or promote with --force"
                )
        return self._move(rollout_id, Transition.ADVANCE, reason)

    def rollback(self, rollout_id: str, reason: str = "rolled back by operator") -> RolloutRecord:
        """Send the whole fleet back to the previous production version (signed)."""
        return self._move(rollout_id, Transition.ROLLBACK, reason)

    def tick(self) -> list[RolloutRecord]:
        """Apply the gates to every running rollout; return the rollouts that moved."""
        moved: list[RolloutRecord] = []
        for record in self.rollouts():
            if record.state is RolloutState.COMPLETED:
                self._ensure_production(record.model, record.version)
            if record.state is not RolloutState.RUNNING:
                continue
            status = self.status(record.id)
            if status.verdict is Verdict.FAIL:
                failing = "; ".join(
                    f"{g.name} {g.detail}" for g in status.gates if g.verdict is Verdict.FAIL
                )
                moved.append(
                    self._move(
                        record.id,
                        Transition.ROLLBACK,
                        f"gates failed at {100 * record.fraction:g} %: {failing}",
                        gates=status.gates,
                    )
                )
            elif status.verdict is Verdict.PASS and status.bake_left_s <= 0:
                moved.append(
                    self._move(
                        record.id,
                        Transition.ADVANCE,
                        f"gates passed at {100 * record.fraction:g} % after the bake time",
                        gates=status.gates,
                    )
                )
        return moved

    # ---------------------------------------------------------------- helpers

    def _move(
        self,
        rollout_id: str,
        transition: Transition,
        reason: str,
        *,
        gates: list[GateResult] | None = None,
    ) -> RolloutRecord:
        record = self.get(rollout_id)
        check_transition(record.state, transition)
        completing = transition is Transition.ADVANCE and record.last_stage
        if completing:
            self._ensure_production(record.model, record.version)
        if transition is Transition.ROLLBACK and record.state is RolloutState.COMPLETED:
            assert record.previous is not None
            self._ensure_production(record.model, record.previous)
        signed: SignedDirective | None = None
        with Session(self._engine) as session, session.begin():
            row = session.get(RolloutRow, rollout_id, with_for_update=True)
            assert row is not None
            current = record_of(row)
            check_transition(current.state, transition)  # another controller may have moved it
            if transition is Transition.ADVANCE:
                if current.last_stage:
                    row.state = RolloutState.COMPLETED.value
                else:
                    row.stage = current.stage + 1
                    row.state = RolloutState.RUNNING.value
                    row.stage_started_at = self._clock()
            elif transition is Transition.PAUSE:
                row.state = RolloutState.PAUSED.value
            elif transition is Transition.RESUME:
                row.state = RolloutState.RUNNING.value
                row.stage_started_at = self._clock()
            elif transition is Transition.ROLLBACK:
                row.state = RolloutState.ROLLED_BACK.value
            row.updated_at, row.reason = _now_text(), reason
            session.flush()
            after = record_of(row)
            if transition is Transition.ADVANCE and not completing:
                signed = self._issue(
                    session, after, DirectiveKind.ROLLOUT, after.version, after.fraction
                )
            elif transition is Transition.ROLLBACK and after.previous is not None:
                signed = self._issue(session, after, DirectiveKind.ROLLBACK, after.previous, 1.0)
            payload = self._payload(after, current.state, transition, reason)
            payload["directive_sequence"] = None if signed is None else signed.directive.sequence
            if gates is not None:
                payload["gates"] = [gate.to_json() for gate in gates]
            self._audit_in(session, AuditEventKind.ROLLOUT_TRANSITION, payload)
        if signed is not None:
            self._published(signed)
        logger.info("rollout %s: %s -> %s (%s)", rollout_id, current.state.value,
                    after.state.value, reason)  # fmt: skip
        return after

    def _issue(
        self,
        session: Session,
        record: RolloutRecord,
        kind: DirectiveKind,
        version: int,
        fraction: float,
    ) -> SignedDirective:
        latest = session.scalar(
            select(func.max(ReleaseDirectiveRow.sequence)).where(
                ReleaseDirectiveRow.model == record.model
            )
        )
        threshold = 1.0 if kind is DirectiveKind.ROLLBACK else self._threshold(record, fraction)
        directive = ReleaseDirective(
            model=record.model,
            version=version,
            kind=kind,
            rollout_id=record.id,
            sequence=(latest or 0) + 1,
            cohort_fraction=threshold,
            previous=record.previous,
            issued_at=self._clock(),
            variants=record.plan.variants,
        )
        signed = self._store.sign_directive(directive)
        session.add(
            ReleaseDirectiveRow(
                model=record.model,
                sequence=directive.sequence,
                rollout_id=record.id,
                document=json.dumps(signed.to_json(), sort_keys=True),
                issued_at=_now_text(),
            )
        )
        return signed

    def _published(self, signed: SignedDirective) -> None:
        if self.on_directive is None:
            return
        try:
            self.on_directive(signed)
        except Exception as exc:  # devices also poll: never undo a commit for a broker
            logger.error("rollout: could not publish directive %d of %s: %s",
                         signed.directive.sequence, signed.directive.model, exc)  # fmt: skip

    def _ensure_production(self, model: str, version: int) -> None:
        if self._store.aliases(model).get(PRODUCTION) != version:
            self._store.tag(model, PRODUCTION, version)

    def _audit_in(self, session: Session, kind: AuditEventKind, payload: dict[str, Any]) -> None:
        if self._audit is not None:
            self._audit.append_in(session, kind, payload, run_id=None)

    @staticmethod
    def _payload(
        record: RolloutRecord,
        before: RolloutState | None,
        transition: Transition,
        reason: str,
    ) -> dict[str, Any]:
        return {
            "rollout": record.id,
            "model": record.model,
            "version": record.version,
            "previous": record.previous,
            "transition": transition.value,
            "from": None if before is None else before.value,
            "to": record.state.value,
            "stage": record.stage,
            "fraction": record.fraction,
            "reason": reason,
        }

    def _fleet_devices(self) -> Collection[str]:
        if self._fleet is not None:
            return self._fleet()
        since = datetime.fromtimestamp(self._clock() - self._fleet_window_s, UTC)
        return self._events.devices_reporting(EventKind.HEALTH, received_after=since)

    def _threshold(self, record: RolloutRecord, fraction: float) -> float:
        """Return the cohort bucket bound that admits at most ``fraction`` of the fleet.

        Buckets are uniform, so ``fraction`` itself admits that share only on average
        (1 % of 1,000 devices is 10 +- 3); the bound is instead placed between the
        fleet's k-th and (k+1)-th smallest buckets, k = floor(fraction * fleet), so no
        more than the stage's fraction of the known fleet is ever exposed. At least one
        device is admitted; later stages never shrink the cohort.
        """
        if fraction >= 1.0:
            return 1.0
        buckets = sorted(cohort_bucket(device, record.id) for device in self._fleet_devices())
        if not buckets:
            return fraction
        admitted = max(1, math.floor(fraction * len(buckets)))
        if admitted >= len(buckets):
            return 1.0
        bound = (buckets[admitted - 1] + buckets[admitted]) / 2
        current = self._stage_threshold(record)
        return max(bound, current) if current is not None and current < 1.0 else bound

    def _stage_threshold(self, record: RolloutRecord) -> float | None:
        """Return the cohort bound of the rollout's newest forward directive, if any."""
        query = (
            select(ReleaseDirectiveRow.document)
            .where(ReleaseDirectiveRow.rollout_id == record.id)
            .order_by(ReleaseDirectiveRow.sequence.desc())
        )
        with Session(self._engine) as session:
            for document in session.scalars(query):
                directive = SignedDirective.from_json(json.loads(document)).directive
                if directive.kind is DirectiveKind.ROLLOUT:
                    return directive.cohort_fraction
        return None

    def _cohort(self, record: RolloutRecord) -> tuple[CohortHealth, int]:
        events = self._events.all_events(
            kinds=HEALTH_KINDS, received_after=datetime.fromtimestamp(record.stage_started_at, UTC)
        )
        cohort = collect(
            events, model=record.model, version=record.version, previous=record.previous
        )
        bound = self._stage_threshold(record) or record.fraction
        expected = sum(
            1
            for device in self._fleet_devices()
            if device not in cohort.opted_out or bound >= 1.0
            if in_cohort(device, record.id, bound)
        )
        return cohort, expected

    def _baseline(self, record: RolloutRecord) -> float | None:
        if record.previous is None:
            return None
        accuracy = self._store.get(record.model, record.previous).manifest.metadata.get("metrics")
        value = accuracy.get("accuracy") if accuracy is not None else None
        return float(value) if isinstance(value, int | float) else None
