"""The fixed wording of a report: DP terms per mode, data flows, threat models, regulations.

Kept apart from the builder so an auditor can review every sentence a report
may state in one place. The DP wording follows NIST SP 800-226 ("Guidelines for
Evaluating Differential Privacy Guarantees", 2025): unit of privacy, the
neighbouring relation, where noise is added and whom that protects against,
and the accountant; the facts restate docs/differential-privacy.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_server.reports.model import DataFlow, RegulatoryRow

__all__ = [
    "DP_TERMS",
    "NO_DP",
    "ROUTINE_KINDS",
    "THREAT_MODELS",
    "DpTerms",
    "data_flows",
    "regulatory_rows",
    "security_category",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class DpTerms:
    """How one DP mode reads in NIST SP 800-226 terms."""

    unit_of_privacy: str
    neighbouring_relation: str
    noise_added_where: str
    protects_against: str
    trusted: str
    accountant: str


_CLIENT_LEVEL = (
    "two federations are neighbours if one has one more client (device) than the other, "
    "with all of that client's data: add/remove one client's whole contribution to a round"
)

DP_TERMS: dict[str, DpTerms] = {
    "central": DpTerms(
        unit_of_privacy="user level: one client device and all of its local data",
        neighbouring_relation=_CLIENT_LEVEL,
        noise_added_where=(
            "on the server, once per round: Gaussian noise N(0, (z C)^2) added to the sum of "
            "client updates clipped to L2 norm C (under secure aggregation the server only "
            "ever sees that sum)"
        ),
        protects_against=(
            "everyone who sees the released models (devices, model consumers, the public); "
            "not against the server, which is trusted to add the noise"
        ),
        trusted="the aggregating server",
        accountant="Renyi DP (Opacus RDP accountant) of the (subsampled) Gaussian mechanism",
    ),
    "distributed": DpTerms(
        unit_of_privacy="user level: one client device and all of its local data",
        neighbouring_relation=_CLIENT_LEVEL,
        noise_added_where=(
            "on every device, before masking: a share of discrete Gaussian noise added to the "
            "clipped, quantised update; the server unmasks only the noisy sum"
        ),
        protects_against=(
            "the server and everyone who sees the released models, within the secure "
            "aggregation threat model and assuming at least the fewest honest contributors "
            "the devices' policies require"
        ),
        trusted="nobody beyond the secure-aggregation threat model",
        accountant=(
            "zero-concentrated DP bound of the distributed discrete Gaussian (Kairouz, Liu, "
            "Steinke, ICML 2021, Thm 1) with the noise of the fewest honest contributors, "
            "converted to (epsilon, delta)"
        ),
    ),
    "local": DpTerms(
        unit_of_privacy="a client's update in one round",
        neighbouring_relation=(
            "replace one client's update with any other (two clipped updates may differ by 2C)"
        ),
        noise_added_where="on every device, to its own clipped update, before it leaves",
        protects_against="everyone beyond the device, the server included",
        trusted="nobody",
        accountant="Gaussian mechanism at z/2 per participation, Renyi DP",
    ),
    "sample": DpTerms(
        unit_of_privacy="example level: one training example on one device",
        neighbouring_relation="add/remove one training example of one device's data set",
        noise_added_where=(
            "on every device, to the clipped per-example gradients of every DP-SGD step (Opacus)"
        ),
        protects_against="everyone beyond the device, for each training example",
        trusted="the device itself",
        accountant="Opacus PRV accountant of each device's Poisson batches",
    ),
    "sample-distributed": DpTerms(
        unit_of_privacy="example level: one training example on one device",
        neighbouring_relation="add/remove one training example of one device's data set",
        noise_added_where=(
            "on every device, before masking: a share of discrete Gaussian noise added to its "
            "clipped per-example gradient sum; the server unmasks only the noisy sum of one "
            "DP-SGD step over every device's examples"
        ),
        protects_against=(
            "the server and everyone who sees the released models, for each training "
            "example, within the secure aggregation threat model and assuming at least the "
            "fewest honest devices the devices' policies require"
        ),
        trusted="nobody beyond the secure-aggregation threat model",
        accountant=(
            "Renyi DP (Opacus RDP) of the subsampled Gaussian at each device's own example "
            "sample rate, with the noise of the fewest honest devices over one example's "
            "sensitivity (rounding included)"
        ),
    ),
}

NO_DP = DpTerms(
    unit_of_privacy="none: the run did not use differential privacy",
    neighbouring_relation="not applicable",
    noise_added_where="no noise is added",
    protects_against="no formal privacy guarantee is claimed",
    trusted="every party that sees updates or models",
    accountant="none",
)

THREAT_MODELS = {
    "semi-honest": (
        "semi-honest (honest but curious) server: it follows the protocol but tries to learn "
        "from what it sees; clients' public keys are not authenticated"
    ),
    "active": (
        "active (malicious) server: devices only accept public keys signed by their enrolment "
        "authority, check the consistency round and refuse parameters outside their policy"
    ),
}


def data_flows(
    *, secure: bool, dp_mode: str, ring_bits: int | None, upload_bytes: int | None
) -> tuple[DataFlow, ...]:
    """Return what leaves a device, where it goes and what the server sees of it."""
    upload = f" ({upload_bytes} bytes per client per round)" if upload_bytes else ""
    if secure:
        update_view = "only the sum of the surviving clients' updates, never one update"
        update_protection = (
            f"SecAgg+ pairwise masks on a {ring_bits or '?'}-bit ring{upload}; masks of "
            "dropped clients are reconstructed from secret shares"
        )
    else:
        update_view = "each client's update, in the clear over TLS"
        update_protection = f"TLS in transit{upload}"
    if dp_mode in {"distributed", "local"}:
        update_protection += "; DP noise added on the device before it leaves"
    elif dp_mode == "central":
        update_protection += "; clipped on the device; noise added by the server"
    elif dp_mode == "sample":
        update_protection += "; trained with DP-SGD on the device"
    elif dp_mode == "sample-distributed":
        update_protection += (
            "; a clipped per-example gradient sum with the device's share of DP noise"
        )
    metrics_view = (
        "nothing per client (per-client metrics never leave under secure aggregation)"
        if secure
        else "each client's example count and training metrics"
    )
    flows = [
        DataFlow(
            item="raw training data",
            source="device",
            destination="stays on the device",
            server_sees="nothing",
            protection="never transmitted",
        ),
        DataFlow(
            item="model update",
            source="device",
            destination="aggregating server",
            server_sees=update_view,
            protection=update_protection,
        ),
        DataFlow(
            item="training metrics and weights",
            source="device",
            destination="aggregating server",
            server_sees=metrics_view,
            protection="TLS in transit",
        ),
        DataFlow(
            item="global model and round configuration",
            source="server",
            destination="sampled devices",
            server_sees="(the server's own output)",
            protection="model digest checked by devices; DP and SecAgg+ parameters checked "
            "against each device's own policy",
        ),
        DataFlow(
            item="published model versions and variants",
            source="model store",
            destination="the fleet",
            server_sees="(the server's own output)",
            protection="content-addressed and signed; devices verify digest and signature",
        ),
    ]
    if secure:
        flows.append(
            DataFlow(
                item="secure-aggregation key material",
                source="device",
                destination="other devices, relayed by the server",
                server_sees="public keys and encrypted shares it cannot decrypt; the shares "
                "it needs to remove dropped clients' masks",
                protection="authenticated key agreement, encrypted shares",
            )
        )
    return tuple(flows)


def regulatory_rows() -> tuple[RegulatoryRow, ...]:
    """Return the provisions a report maps its evidence to (evidence, not legal advice)."""
    return (
        RegulatoryRow(
            framework="GDPR",
            provision="Art. 5 (principles; 5(1)(c) data minimisation, 5(1)(f) integrity and "
            "confidentiality, 5(2) accountability)",
            topic="personal data processed minimally and securely, and demonstrably so",
            evidence="raw data never leaves a device; what the server sees; DP guarantee; "
            "secure aggregation; the verified audit trail",
            sections=(
                "Data flows",
                "Differential privacy",
                "Secure aggregation",
                "Trail verification",
            ),
        ),
        RegulatoryRow(
            framework="GDPR",
            provision="Art. 25 (data protection by design and by default)",
            topic="technical measures built into the processing",
            evidence="pseudonymous participant ids; DP mode, clip norm, noise and budgets; "
            "secure-aggregation threat model and parameters",
            sections=("Participants", "Differential privacy", "Secure aggregation"),
        ),
        RegulatoryRow(
            framework="GDPR",
            provision="Art. 30 (records of processing activities)",
            topic="what was processed, by whom, when, with which configuration",
            evidence="run provenance (code version, configuration hash, packages); "
            "participants; data flows",
            sections=("Run provenance", "Participants", "Data flows"),
        ),
        RegulatoryRow(
            framework="GDPR",
            provision="Art. 35 (data protection impact assessment)",
            topic="input to assessing the risk to data subjects",
            evidence="quantified privacy loss (epsilon, delta, per round and in total), whom "
            "the noise protects against, threat model, security events",
            sections=("Differential privacy", "Secure aggregation", "Security events"),
        ),
        RegulatoryRow(
            framework="EU AI Act",
            provision="Art. 12 (record-keeping)",
            topic="automatic logging of events over the system's lifetime",
            evidence="the hash-chained audit trail and its verification; model lineage and "
            "releases; run provenance",
            sections=("Trail verification", "Model lineage and releases", "Run provenance"),
        ),
        RegulatoryRow(
            framework="HIPAA",
            provision="45 CFR 164.312(b) (audit controls)",
            topic="mechanisms that record and examine activity",
            evidence="audit trail with tamper evidence, its verification result and the "
            "security events",
            sections=("Trail verification", "Security events"),
        ),
    )


_SECURITY_CATEGORIES = {
    "device.enrolled": "enrolment",
    "device.node_registered": "enrolment",
    "enrolment.tokens_created": "enrolment",
    "device.revoked": "revocation",
    "privacy.budget_exhausted": "privacy budget",
    "run.failed": "run failure",
    "run.resumed": "run resumption",
    "store.gc": "artefact deletion",
    "enrolment.refused": "enrolment refusal",
    "auth.failed": "authentication failure",
    "audit.suppressed": "refusals summarised (flood limit)",
    "config.loaded": "configuration",
    "config.changed": "configuration change",
    "key.created": "key creation",
    "privacy.ledger_adopted": "ledger adoption (rows vouched for by an operator)",
    "store.release_refused": "release refused by policy",
    "store.rollback_signed": "fleet rollback",
    "rollout.transition": "rollout transition",
    "device.events_rejected": "device events rejected (forged, replayed or malformed)",
    "retraining.requested": "retraining requested (drift)",
}

# Kinds that are routine records of a run, not security events.
ROUTINE_KINDS = frozenset(
    {
        "run.started",
        "run.completed",
        "round.completed",
        "model.saved",
        "privacy.spent",
        "store.published",
        "store.alias_moved",
        "store.downloaded",
        "rollout.started",
    }
)


def security_category(kind: str) -> str | None:
    """Return the security category of an event kind; ``None`` for a routine record.

    A kind this fedge does not know (written by a newer one: authentication
    failures, key rotations, ...) is listed as a security event rather than
    dropped.
    """
    from fl_server.audit.events import AuditEventKind

    if kind in ROUTINE_KINDS:
        return None
    if kind in _SECURITY_CATEGORIES:
        return _SECURITY_CATEGORIES[kind]
    prefix = kind.split(".", 1)[0]
    known = {member.value for member in AuditEventKind}
    return prefix if kind in known else f"{prefix} (kind unknown to this fedge version)"
