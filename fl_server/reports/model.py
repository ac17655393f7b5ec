"""The typed compliance report: one document, built once, rendered as JSON, HTML and PDF.

Every renderer reads the same frozen document; :meth:`RunReport.to_json` is the
JSON form that ``schema.json`` (beside this module) describes, so the schema in
the repository is the contract of the JSON output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DISCLAIMER",
    "SCHEMA_VERSION",
    "SECTIONS",
    "AliasMove",
    "Artefact",
    "Checkpoint",
    "ClientBudget",
    "ClientBudgets",
    "DamagedRecord",
    "DataFlow",
    "DataFlows",
    "Device",
    "DifferentialPrivacy",
    "DpRound",
    "ExhaustionEvent",
    "FleetReport",
    "FleetRun",
    "Lineage",
    "Participants",
    "Provenance",
    "PublishedVersion",
    "RegulatoryMapping",
    "RegulatoryRow",
    "Resumption",
    "RoundParticipation",
    "RoundRow",
    "RunReport",
    "SecAggRound",
    "SecureAggregation",
    "SecurityEvent",
    "SecurityEvents",
    "Subject",
    "Summary",
    "Verification",
]

SCHEMA_VERSION = 1

# The section headings of a run report, in order (HTML, PDF and the tests use them).
SECTIONS = (
    "Summary",
    "Run provenance",
    "Participants",
    "Data flows",
    "Differential privacy",
    "Secure aggregation",
    "Model lineage and releases",
    "Security events",
    "Trail verification",
    "Regulatory mapping",
)

DISCLAIMER = (
    "This report states evidence drawn from fedge's records (the hash-chained audit "
    "trail, the privacy ledger, the model store and the device registry). It is not "
    "legal advice and does not by itself establish compliance with any law or "
    "regulation; a qualified person must assess it in context."
)


def _plain(value: Any) -> Any:
    """Return ``value`` as JSON-ready lists and dicts (tuples become lists)."""
    return json.loads(json.dumps(value, allow_nan=False))


@dataclass(frozen=True, slots=True, kw_only=True)
class DamagedRecord:
    """An audit record that fails its hash or its link: listed, never trusted for numbers."""

    seq: int
    recorded_at: str
    kind: str
    problem: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """What a reader needs first: status, rounds, epsilon, and whether the trail holds."""

    run_id: str
    status: str
    started_at: str | None
    ended_at: str | None
    rounds_completed: int
    rounds_planned: int | None
    final_accuracy: float | None
    dp_mode: str
    epsilon: float | None
    delta: float | None
    epsilon_budget: float | None
    secure_aggregation: bool
    participants: int | None
    trail_intact: bool
    damaged_records: int
    banner: str | None
    statements: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumption:
    """A restart of a crashed run: the round abandoned (and charged) and the code that resumed."""

    recorded_at: str
    after_round: int | None
    abandoned_round: int | None
    code_version: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """What produced the run: code, configuration (and its hash), packages, data."""

    code_version: str | None
    config_sha256: str | None
    config_sha256_recomputed: str | None
    config_hash_matches: bool | None
    packages: Mapping[str, str]
    config: Mapping[str, Any]
    data: Mapping[str, Any]
    started_at: str | None
    ended_at: str | None
    end_status: str
    end_error: str | None
    resumptions: tuple[Resumption, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """An enrolled device by its pseudonymous ids; its key only as a SHA-256 fingerprint."""

    device_id: str
    node_id: int | None
    identity_fingerprint: str
    enrolled_at: str
    status: str
    revoked_at: str | None
    rounds_charged: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Subject:
    """A ledger subject of the run (a device id, else a node id) and the rounds it was charged."""

    subject: str
    rounds_charged: int
    epsilon: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundParticipation:
    """One round's counts: sampled, completed, dropped, refused (never who)."""

    round: int
    sampled: int | None
    completed: int | None
    dropped: int | None
    failures: int | None
    refused: Mapping[str, int]
    damaged: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Participants:
    """Who could take part and how many did, round by round."""

    source: str
    identity_note: str
    sample_withheld: bool
    sample_withheld_reason: str | None
    devices: tuple[Device, ...]
    subjects: tuple[Subject, ...]
    distinct_participants: int | None
    per_round: tuple[RoundParticipation, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DataFlow:
    """One kind of data: where it goes and what the server can see of it."""

    item: str
    source: str
    destination: str
    server_sees: str
    protection: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DataFlows:
    """What left each device and what the server could see."""

    flows: tuple[DataFlow, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DpRound:
    """One round of the privacy ledger (the run's rows, else its worst client's)."""

    round: int
    mechanism: str
    epsilon_round: float | None
    epsilon_cumulative: float | None
    rho: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    clients_charged: int | None
    abandoned: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientBudget:
    """One client's spend in the run and over its lifetime, against the lifetime cap."""

    subject: str
    run_epsilon: float
    lifetime_epsilon: float | None
    status: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientBudgets:
    """Per-client and lifetime budget status (aggregates only when the sample is secret)."""

    charged: int
    max_epsilon: float | None
    median_epsilon: float | None
    lifetime_cap: float | None
    over_lifetime_cap: int
    listed: bool
    clients: tuple[ClientBudget, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExhaustionEvent:
    """A ``privacy.budget_exhausted`` event: the run stopped before a round went over."""

    seq: int
    recorded_at: str
    reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DifferentialPrivacy:
    """The DP guarantee in the terms of NIST SP 800-226."""

    enabled: bool
    mode: str
    mechanism: str | None
    unit_of_privacy: str
    neighbouring_relation: str
    noise_added_where: str
    protects_against: str
    trusted: str
    clip_norm: float | None
    adaptive_clipping: bool
    noise_multiplier: float | None
    sampling: str
    amplification_claimed: bool
    amplification_reason: str | None
    accountant: str
    delta: float | None
    epsilon_budget: float | None
    epsilon_total: float | None
    epsilon_stored: float | None
    device_epsilon: float | None
    """The worst device's epsilon as the devices' own ledgers state it (recorded in the
    trail at the run's end); the server cannot verify it: each device enforces it."""
    ledger_problem: str | None
    budget_status: str
    per_round: tuple[DpRound, ...]
    clients: ClientBudgets
    exhaustion_events: tuple[ExhaustionEvent, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggRound:
    """One secure round as the server observed it."""

    round: int
    sampled: int | None
    survivors: int | None
    dropped: int | None
    refused: Mapping[str, int]
    degree: int | None
    threshold: int | None
    ring_bits: int | None
    quant_bits: int | None
    aborted: str | None
    upload_bytes_per_client: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureAggregation:
    """The secure-aggregation protocol, its threat model and what each round observed."""

    enabled: bool
    protocol: str | None
    threat_model: str | None
    threat_model_description: str | None
    per_round: tuple[SecAggRound, ...]
    dropouts_total: int
    aborted_rounds: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Artefact:
    """One stored artefact (weights, an ONNX variant) of a published version."""

    name: str
    format: str
    precision: str
    status: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedVersion:
    """One version of the model the run published: lineage, epsilon, signature key."""

    model: str
    version: int
    parent_version: int | None
    server_round: int | None
    created_at: str
    dp_epsilon: float | None
    dp_delta: float | None
    participants: int | None
    key_id: str
    artefacts: tuple[Artefact, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AliasMove:
    """A ``store.alias_moved`` event: an alias (production, canary) moved to a version."""

    seq: int
    recorded_at: str
    model: str | None
    alias: str | None
    version: int | None
    previous: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Lineage:
    """Model versions, their variants, and releases (alias moves, canaries, rollbacks)."""

    versions: tuple[PublishedVersion, ...]
    rollout_recorded: bool
    rollout_statement: str
    alias_moves: tuple[AliasMove, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityEvent:
    """An event bearing on security: enrolment, revocation, budget, failure, unknown kinds."""

    seq: int
    recorded_at: str
    kind: str
    category: str
    run_id: str | None
    description: str
    damaged: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityEvents:
    """The security events of the run's window."""

    window: str
    events: tuple[SecurityEvent, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """An external anchor of the chain's head the trail was verified against."""

    seq: int | None
    head_hash: str | None
    signed_at: str | None
    key_id: str | None
    source: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """The verification result of the trail and the damage found while reading the run."""

    ok: bool
    records_checked: int
    head_hash: str
    first_bad_seq: int | None
    reason: str
    checkpoint: Checkpoint | None
    statement: str
    ledger_ok: bool | None
    ledger_problems: tuple[str, ...]
    run_records: int
    damaged_records: tuple[DamagedRecord, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RegulatoryRow:
    """One provision and the report's evidence bearing on it."""

    framework: str
    provision: str
    topic: str
    evidence: str
    sections: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RegulatoryMapping:
    """Evidence mapped to provisions: evidence, not legal advice."""

    disclaimer: str
    rows: tuple[RegulatoryRow, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRow:
    """One ``round.completed`` event (numbers ``None`` where the record is damaged)."""

    round: int
    accuracy: float | None
    loss: float | None
    replies: int | None
    failures: int | None
    seconds: float | None
    model_sha256: str | None
    damaged: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    """The compliance report of one run."""

    schema_version: int
    report_kind: str
    generated_at: str
    generator: str
    title: str
    summary: Summary
    provenance: Provenance
    participants: Participants
    data_flows: DataFlows
    differential_privacy: DifferentialPrivacy
    secure_aggregation: SecureAggregation
    lineage: Lineage
    security_events: SecurityEvents
    verification: Verification
    regulatory_mapping: RegulatoryMapping
    rounds: tuple[RoundRow, ...]

    def to_json(self) -> dict[str, Any]:
        """Return the document as JSON values (the form ``schema.json`` describes)."""
        result: dict[str, Any] = _plain(dataclasses.asdict(self))
        return result


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetRun:
    """One run of a fleet period."""

    run_id: str
    started_at: str | None
    status: str
    rounds: int
    dp_mode: str
    epsilon: float | None
    device_epsilon: float | None
    """Sample-level DP: the worst device's epsilon by the devices' own ledgers (unverifiable)."""
    ledger_problem: str | None
    delta: float | None
    secure_aggregation: bool
    participants: int | None
    """Distinct clients the ledger charged, else the most replies a round used."""
    damaged_records: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetReport:
    """The summary of every run started in a period."""

    schema_version: int
    report_kind: str
    generated_at: str
    generator: str
    title: str
    since: str | None
    until: str | None
    runs: tuple[FleetRun, ...]
    total_rounds: int
    max_epsilon: float | None
    verification: Verification
    disclaimer: str

    def to_json(self) -> dict[str, Any]:
        """Return the document as JSON values (the form ``schema.json`` describes)."""
        result: dict[str, Any] = _plain(dataclasses.asdict(self))
        return result
