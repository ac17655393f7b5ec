"""The tamper-evident audit trail every fedge component writes to."""

from fl_server.audit.events import AuditEvent, AuditEventKind, canonical_json
from fl_server.audit.log import AuditLog, VerifyReport

__all__ = ["AuditEvent", "AuditEventKind", "AuditLog", "VerifyReport", "canonical_json"]
