"""Verify device events and store each once: the broker-independent core of the ingestor.

:class:`EventIngestor` takes (topic, payload) pairs as MQTT delivers them and, for
each, parses the envelope strictly, checks that the event names the device its
certificate names, verifies the certificate against the enrolment authority's key
(unexpired on the server's clock) and the event's signature, checks that it came on
its own device's topic and, when a registry lookup is given, that the device is
enrolled and not revoked. Verified events are stored (:class:`EventStore`) once per
(device, seq); duplicates are counted and dropped; everything else is refused, never
stored, counted by reason and audited (:class:`RejectionRecorder`).

Notes
-----
Threat model: the broker and anyone who can publish to it are untrusted. One device
cannot speak for another: its key signs only its own id (certificate), and the topic
must match. A captured event replayed later is a duplicate of what is stored and is
dropped. A device's own events can still lie about its health; gates read many
devices, so one device cannot promote or abort a rollout alone.

A certificate that verified is remembered (by its exact bytes) so each event costs
one signature check, not two; its expiry is still checked on every event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from edge_runtime.device_events import DeviceEvent, EventMalformed, parse_event
from edge_runtime.mqtt_config import DEFAULT_TOPIC_ROOT, device_of_topic
from fedge.errors import ConfigError
from fl_server.enrolment.registry import DeviceRegistry
from fl_server.events.rejections import RejectionRecorder, RejectReason
from fl_server.events.store import EventStore, InsertOutcome
from secure_agg.crypto import KEY_BYTES, verify_signature
from secure_agg.errors import CryptoError
from secure_agg.identity import IdentityCertificate

__all__ = [
    "DeviceStanding",
    "EventIngestor",
    "IngestOutcome",
    "IngestResult",
    "IngestStats",
    "StandingLookup",
    "registry_standing",
]

logger = logging.getLogger(__name__)

_CERTIFICATE_CACHE = 65_536


class DeviceStanding(Enum):
    """What the registry says of a device that signed an event."""

    ACTIVE = "active"
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # not enrolled here, or enrolled with another identity key


StandingLookup = Callable[[str, bytes], DeviceStanding]
"""Given a device id and the identity key that signed, say whether the device may report."""


class IngestOutcome(Enum):
    """What became of one delivered message."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestResult:
    """The fate of one message: stored, a duplicate, or rejected (with why)."""

    outcome: IngestOutcome
    reason: RejectReason | None = None
    device: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestStats:
    """Counters since the ingestor started."""

    received: int
    stored: int
    duplicates: int
    rejected: dict[str, int]

    @property
    def rejected_total(self) -> int:
        """All rejections, whatever the reason."""
        return sum(self.rejected.values())


def registry_standing(
    registry: DeviceRegistry, *, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic
) -> StandingLookup:
    """Return a lookup of device standing that reads ``registry``, cached for ``ttl_s``.

    A revoked device is remembered for good (revocation is permanent); an active or
    unknown one is asked again after ``ttl_s``, so a revocation takes effect within
    that time. A device enrolled with another identity key than the one that signed
    is ``UNKNOWN``.

    Raises
    ------
    ConfigError
        If ``ttl_s`` is negative.
    """
    if not isinstance(ttl_s, int | float) or ttl_s < 0:
        raise ConfigError(f"ttl_s must be a number >= 0, got {ttl_s!r:.40}")
    cache: dict[tuple[str, bytes], tuple[DeviceStanding, float]] = {}
    lock = threading.Lock()

    def lookup(device_id: str, public_key: bytes) -> DeviceStanding:
        key = (device_id, public_key)
        now = clock()
        with lock:
            cached = cache.get(key)
        if cached is not None and (cached[0] is DeviceStanding.REVOKED or now < cached[1]):
            return cached[0]
        device = registry.device(device_id)
        if device is None or device.identity_public_key != public_key:
            standing = DeviceStanding.UNKNOWN
        else:
            standing = DeviceStanding.ACTIVE if device.is_active else DeviceStanding.REVOKED
        with lock:
            if len(cache) >= _CERTIFICATE_CACHE:
                cache.clear()
            cache[key] = (standing, now + ttl_s)
        return standing

    return lookup


def _utc_now() -> datetime:
    return datetime.now(UTC)


class EventIngestor:
    """Verify, de-duplicate and store device events; count and audit what it refuses.

    Parameters
    ----------
    store
        Where verified events go.
    authority_public_key
        The enrolment authority's raw Ed25519 key (32 bytes) that certifies devices.
    rejections
        Audits refused events (rate-limited).
    standing
        Optional lookup of a device's registry standing (:func:`registry_standing`);
        without it every device with a valid certificate may report.
    topic_root
        The first level(s) of the event topics.
    on_stored
        Called with the events each batch stored (the drift trigger, say); its
        errors are logged, never raised into ingestion.
    clock
        The server's time (timezone-aware): certificate expiry and ``received_at``.

    Raises
    ------
    ConfigError
        If the authority key does not have 32 bytes.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        authority_public_key: bytes,
        rejections: RejectionRecorder,
        standing: StandingLookup | None = None,
        topic_root: str = DEFAULT_TOPIC_ROOT,
        on_stored: Callable[[Sequence[DeviceEvent]], object] | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not isinstance(authority_public_key, bytes) or len(authority_public_key) != KEY_BYTES:
            raise ConfigError(f"the authority's public key has exactly {KEY_BYTES} bytes")
        self._store = store
        self._authority = authority_public_key
        self._rejections = rejections
        self._standing = standing
        self._topic_root = topic_root
        self._on_stored = on_stored
        self._clock = clock
        self._certificates: OrderedDict[tuple[str, bytes, bytes, int | None], None] = OrderedDict()
        self._lock = threading.Lock()
        self._received = self._stored = self._duplicates = 0
        self._rejected: Counter[str] = Counter()

    @property
    def store(self) -> EventStore:
        """Where verified events are stored."""
        return self._store

    @property
    def topic_root(self) -> str:
        """The first level(s) of the topics it accepts events on."""
        return self._topic_root

    @property
    def rejections(self) -> RejectionRecorder:
        """The recorder that audits refused events."""
        return self._rejections

    def stats(self) -> IngestStats:
        """Return the counters so far."""
        with self._lock:
            return IngestStats(
                received=self._received,
                stored=self._stored,
                duplicates=self._duplicates,
                rejected=dict(self._rejected),
            )

    def ingest(self, topic: str, payload: bytes) -> IngestResult:
        """Ingest one message; see :meth:`ingest_many`."""
        return self.ingest_many([(topic, payload)])[0]

    def ingest_many(self, messages: Sequence[tuple[str, bytes]]) -> list[IngestResult]:
        """Verify each (topic, payload), store the verified ones in one transaction.

        Returns
        -------
        list[IngestResult]
            One per message, in order.

        Raises
        ------
        StorageError
            If the database refuses the batch: nothing of it is stored or counted,
            and the caller should deliver it again (MQTT: do not acknowledge it).
        """
        moment = self._clock()
        if not isinstance(moment, datetime) or moment.tzinfo is None:
            raise ConfigError("the ingestor's clock must return timezone-aware datetimes")
        now = int(moment.timestamp())
        results: list[IngestResult | None] = [None] * len(messages)
        refused: list[tuple[int, RejectReason, str | None, DeviceEvent | None]] = []
        accepted: list[tuple[int, DeviceEvent]] = []
        for index, (topic, payload) in enumerate(messages):
            topic_device = device_of_topic(topic, self._topic_root)
            try:
                event = parse_event(payload)
            except EventMalformed as error:
                logger.debug("refused an event on %r: %s", topic[:200], error)
                refused.append((index, RejectReason.MALFORMED, topic_device, None))
                continue
            reason = self._check(event, topic_device, now)
            if reason is None:
                accepted.append((index, event))
            else:
                refused.append((index, reason, topic_device, event))
        outcomes = (
            self._store.insert([event for _, event in accepted], received_at=moment)
            if accepted
            else []
        )
        stored: list[DeviceEvent] = []
        duplicates = 0
        for (index, event), outcome in zip(accepted, outcomes, strict=True):
            if outcome is InsertOutcome.STORED:
                stored.append(event)
                results[index] = IngestResult(
                    outcome=IngestOutcome.STORED, device=event.device, seq=event.seq
                )
            elif outcome is InsertOutcome.DUPLICATE:
                duplicates += 1
                results[index] = IngestResult(
                    outcome=IngestOutcome.DUPLICATE, device=event.device, seq=event.seq
                )
            else:
                refused.append((index, RejectReason.SEQ_CONFLICT, event.device, event))
        for index, reason, topic_device, parsed in refused:
            self._rejections.record(
                reason,
                topic_device,
                device=None if parsed is None else parsed.device,
                seq=None if parsed is None else parsed.seq,
            )
            results[index] = IngestResult(
                outcome=IngestOutcome.REJECTED,
                reason=reason,
                device=None if parsed is None else parsed.device,
                seq=None if parsed is None else parsed.seq,
            )
        with self._lock:
            self._received += len(messages)
            self._stored += len(stored)
            self._duplicates += duplicates
            self._rejected.update(reason.value for _, reason, _, _ in refused)
        if stored and self._on_stored is not None:
            try:
                self._on_stored(stored)
            except Exception:  # a listener's failure must not lose or re-deliver events
                logger.exception("a device-event listener failed")
        return [result for result in results if result is not None]

    def _check(self, event: DeviceEvent, topic_device: str | None, now: int) -> RejectReason | None:
        certificate = event.certificate
        if event.device != certificate.enrolment_id:
            return RejectReason.IDENTITY_MISMATCH
        try:
            self._check_certificate(certificate, now)
            verify_signature(certificate.public_key, event.signature, event.signed_message())
        except CryptoError:
            return RejectReason.BAD_SIGNATURE
        if topic_device != event.device:
            return RejectReason.TOPIC_MISMATCH
        if self._standing is not None:
            standing = self._standing(event.device, certificate.public_key)
            if standing is DeviceStanding.REVOKED:
                return RejectReason.REVOKED
            if standing is not DeviceStanding.ACTIVE:
                return RejectReason.UNKNOWN_DEVICE
        return None

    def _check_certificate(self, certificate: IdentityCertificate, now: int) -> None:
        if certificate.expires_at is not None and now >= certificate.expires_at:
            raise CryptoError
        key = (
            certificate.enrolment_id,
            certificate.public_key,
            certificate.signature,
            certificate.expires_at,
        )
        with self._lock:
            if key in self._certificates:
                self._certificates.move_to_end(key)
                return
        certificate.verify_at_time(self._authority, now)
        with self._lock:
            self._certificates[key] = None
            if len(self._certificates) > _CERTIFICATE_CACHE:
                self._certificates.popitem(last=False)
