"""The device's rollout agent: follow signed release directives, fetch, swap, report.

:class:`RolloutAgent` turns each directive that reaches the device (a retained MQTT
message of ``fedge rollout run``) into an action: the device's own
:class:`~edge_runtime.directive_guard.DirectiveGuard` checks the signature, the
sequence, the cohort and the direction; an install or a signed rollback goes
through :func:`~fl_client.model_sync.sync_model` (HTTPS, the enrolled identity, the
signed manifest and every byte verified, blue-green swap), pinned to the exact
version the directive names; the outcome is reported as a signed device event.
Whatever fails, the model that ran keeps running and the directive is not marked
done, so the next delivery retries it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edge_runtime.device_events import EventKind
from edge_runtime.directive_guard import Action, Decision, DirectiveGuard, DirectiveRefused
from edge_runtime.release import SignedDirective
from fedge.errors import ConfigError, FedgeError
from fl_client.model_sync import SyncConfig, SyncResult, sync_model

__all__ = ["RolloutAgent"]

logger = logging.getLogger(__name__)

Report = Callable[[EventKind, dict[str, Any]], object]


class RolloutAgent:
    """Act on the release directives of one model for this device.

    Parameters
    ----------
    sync
        Where the store and the device's enrolment and cache are (its ``ref`` is
        replaced by each directive's version).
    device_id
        The device's enrolment id (its cohort bucket is computed from it).
    opted_out
        The owner declined canary stages.
    device_class
        The device's measured class; the directive's variant for it is preferred.
    report
        Publishes a device event (an :class:`~edge_runtime.mqtt_publisher.EventPublisher`'s
        ``emit``); ``None`` reports nothing.
    syncer
        Fetches and installs (injected in tests).
    """

    def __init__(
        self,
        sync: SyncConfig,
        *,
        device_id: str,
        opted_out: bool = False,
        device_class: str | None = None,
        report: Report | None = None,
        syncer: Callable[[SyncConfig], SyncResult] = sync_model,
    ) -> None:
        self._sync = sync
        self._guard = DirectiveGuard(
            sync.cache_dir,
            device_id=device_id,
            store_public_key=sync.store_key,
            opted_out=opted_out,
            device_class=device_class,
        )
        self._report = report
        self._syncer = syncer
        self._current: int | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue()

    @property
    def config(self) -> SyncConfig:
        """Where this agent fetches from and installs to."""
        return self._sync

    @property
    def current_version(self) -> int | None:
        """The version this agent last installed or found current (``None``: unknown yet)."""
        return self._current

    def handle(self, signed: SignedDirective, *, current: int | None) -> Decision:
        """Act on one directive; return what was decided (and done).

        Raises
        ------
        DirectiveRefused
            If the directive is forged, replayed, for another model or a backwards rollout.
        FedgeError
            If the fetch or the install fails (nothing changed; the directive stays pending).
        """
        model = self._sync.model
        decision = self._guard.decide(signed, model=model, current=current)
        if decision.action in (Action.INSTALL, Action.ROLLBACK):
            assert decision.version is not None
            rollback = decision.action is Action.ROLLBACK
            prefer = self._sync.prefer
            if decision.artefact is not None:  # the fleet measured this device class
                prefer = (decision.artefact, *(n for n in prefer if n != decision.artefact))
            result = self._syncer(
                replace(
                    self._sync,
                    ref=str(decision.version),
                    allow_downgrade=rollback,
                    prefer=prefer,
                )
            )
            installed = result.install.current.version
            if installed != decision.version:  # the client pins numeric refs; never trust it
                raise ConfigError(
                    f"asked for v{decision.version}, the store installed v{installed}"
                )
            self._current = installed
            self._emit(
                EventKind.MODEL_INSTALLED,
                {
                    "model": model,
                    "version": installed,
                    "from_version": current,
                    "rollback": rollback,
                    "rollout_id": signed.directive.rollout_id,
                },
            )
            logger.info("rollout agent: %s v%d (%s)", model, installed, decision.reason)
        else:
            self._current = current
            logger.info("rollout agent: %s stays on v%s (%s)", model, current, decision.reason)
        self._guard.acted(model, decision)
        return decision

    def deliver(self, payload: bytes) -> None:
        """Queue a directive as received (an MQTT message's payload); :meth:`run` acts on it."""
        self._queue.put(bytes(payload))

    def run(self, current: Callable[[], int | None], stop: threading.Event) -> None:
        """Act on delivered directives until ``stop`` is set; never raises for one bad message."""
        while not stop.is_set():
            try:
                payload = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if payload is None:
                return
            try:
                signed = SignedDirective.from_json(json.loads(payload))
                self.handle(signed, current=current())
            except DirectiveRefused as exc:
                logger.warning("rollout agent: directive refused: %s", exc)
            except (ValueError, ConfigError) as exc:
                logger.warning("rollout agent: malformed directive ignored: %s", exc)
            except FedgeError as exc:
                logger.error("rollout agent: could not act on the directive (retried): %s", exc)

    def close(self) -> None:
        """Wake :meth:`run` so it returns."""
        self._queue.put(None)

    def _emit(self, kind: EventKind, body: dict[str, Any]) -> None:
        if self._report is None:
            return
        try:
            self._report(kind, body)
        except FedgeError as exc:  # reporting never undoes an install
            logger.error("rollout agent: could not record the %s event: %s", kind.value, exc)
