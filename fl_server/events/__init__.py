"""Device events over MQTT: verified, de-duplicated ingestion, storage and the drift trigger.

Devices publish signed events (:mod:`edge_runtime.device_events`,
:mod:`edge_runtime.mqtt_publisher`); :class:`MqttIngestService` feeds them to an
:class:`EventIngestor`, which stores each verified event once in
:class:`EventStore` and audits what it refuses; the rollout controller reads
:meth:`EventStore.events` and :meth:`EventStore.latest_seq`, and a
:class:`DriftTrigger` asks for retraining when enough of the fleet drifts.
See docs/device-events.md.
"""

from fl_server.events.drift import DriftPolicy, DriftTrigger, RetrainingRequest, is_drift_alert
from fl_server.events.ingest import (
    DeviceStanding,
    EventIngestor,
    IngestOutcome,
    IngestResult,
    IngestStats,
    StandingLookup,
    registry_standing,
)
from fl_server.events.mqtt import DEFAULT_INGESTOR_CLIENT_ID, MqttIngestService
from fl_server.events.rejections import RejectionLimits, RejectionRecorder, RejectReason
from fl_server.events.store import MAX_READ, EventStore, InsertOutcome, StoredEvent

__all__ = [
    "DEFAULT_INGESTOR_CLIENT_ID",
    "MAX_READ",
    "DeviceStanding",
    "DriftPolicy",
    "DriftTrigger",
    "EventIngestor",
    "EventStore",
    "IngestOutcome",
    "IngestResult",
    "IngestStats",
    "InsertOutcome",
    "MqttIngestService",
    "RejectReason",
    "RejectionLimits",
    "RejectionRecorder",
    "RetrainingRequest",
    "StandingLookup",
    "StoredEvent",
    "is_drift_alert",
    "registry_standing",
]
