"""The report builder on a database populated through the real APIs, intact and damaged."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fl_server.audit.reading import checked_records
from fl_server.audit.verify import verify_trail
from fl_server.ledger import PrivacyLedger
from fl_server.reports import SECTIONS, build_fleet_report, build_run_report, verification_of
from fl_server.reports.cli import validate_report
from fl_server.reports.model import RunReport
from fl_server.reports.render_html import render_html
from tests.unit.fl_server.reports.conftest import (
    ROUNDS,
    RUN,
    SAMPLED,
    SURVIVORS,
    Populated,
    append_raw,
    populate,
    sim_config,
)


def _report(populated: Populated, run_id: str | None = RUN) -> RunReport:
    return build_run_report(
        populated.engine,
        run_id=run_id,
        verification=verification_of(verify_trail(populated.engine)),
    )


def test_a_secure_dp_run_has_every_section_and_the_ledgers_numbers(populated: Populated) -> None:
    report = _report(populated, run_id=None)  # the newest run

    ledger_epsilon = PrivacyLedger(populated.engine).run_epsilon(RUN, delta=1e-5)
    dp = report.differential_privacy
    assert report.summary.run_id == RUN
    assert dp.epsilon_total == ledger_epsilon == report.summary.epsilon
    assert dp.per_round[-1].epsilon_cumulative == pytest.approx(ledger_epsilon)
    assert sum(r.epsilon_round or 0 for r in dp.per_round) == pytest.approx(ledger_epsilon)
    assert [r.clients_charged for r in dp.per_round] == list(SURVIVORS)
    assert dp.clip_norm == 1.0 and dp.noise_multiplier == 1.0
    assert dp.unit_of_privacy.startswith("user level")
    assert dp.budget_status == "within budget"
    assert dp.clients.listed and dp.clients.charged == 4 and dp.clients.lifetime_cap == 100.0
    assert all(c.status == "within the lifetime cap" for c in dp.clients.clients)
    assert [(p.sampled, p.completed, p.dropped) for p in report.participants.per_round] == [
        (s, c, s - c) for s, c in zip(SAMPLED, SURVIVORS, strict=True)
    ]
    assert report.secure_aggregation.dropouts_total == sum(SAMPLED) - sum(SURVIVORS)
    assert [r.threshold for r in report.secure_aggregation.per_round] == [2] * ROUNDS
    assert report.summary.rounds_completed == ROUNDS
    assert report.summary.trail_intact and report.summary.banner is None
    assert [v.version for v in report.lineage.versions] == [1, 2, 3]
    assert [v.parent_version for v in report.lineage.versions] == [None, 1, 2]
    assert not report.lineage.rollout_recorded
    assert "no rollout is recorded" in report.lineage.rollout_statement
    assert report.provenance.packages == {"flwr": "1.42.0", "torch": "2.13.0"}
    assert report.provenance.config_hash_matches is False  # the fixture records zeros
    devices = report.participants.devices
    assert {d.device_id for d in devices} == set(populated.devices)
    assert all(len(d.identity_fingerprint) == 64 for d in devices)
    assert "not verified against any external checkpoint" in report.verification.statement
    assert [row.framework for row in report.regulatory_mapping.rows].count("GDPR") == 4
    validate_report(report.to_json())
    page = render_html(report)
    for heading in SECTIONS:
        assert f">{heading}</h2>" in page
    assert "not legal advice" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_a_checkpoint_is_named_in_the_verification(populated: Populated) -> None:
    verification = verification_of(verify_trail(populated.engine)) | {
        "checkpoint": {
            "seq": 5,
            "head_hash": "ab" * 32,
            "signed_at": "2026-03-01T00:00:00+00:00",
            "key_id": "k1",
            "source": "checkpoints.jsonl",
        },
        "ledger": {"ok": True, "problems": []},
    }
    report = build_run_report(populated.engine, run_id=RUN, verification=verification)
    assert report.verification.statement.startswith("verified against checkpoint at record 5")
    assert report.verification.ledger_ok is True
    validate_report(report.to_json())


def test_an_unknown_run_is_one_clear_error(populated: Populated) -> None:
    with pytest.raises(ConfigError, match="run 'nope' is not recorded"):
        _report(populated, run_id="nope")


def test_a_poisson_sampled_run_lists_counts_never_the_sample(tmp_path: Path) -> None:
    made = populate(
        tmp_path / "fedge.db",
        sim_config(poisson_sampling=True, fraction_train=0.5),
        blobs=tmp_path / "blobs",
    )
    try:
        report = _report(made)
    finally:
        made.engine.dispose()
    assert report.participants.sample_withheld
    assert report.participants.subjects == ()
    assert all(d.rounds_charged is None for d in report.participants.devices)
    assert not report.differential_privacy.clients.listed
    assert report.differential_privacy.clients.clients == ()
    assert report.differential_privacy.clients.charged == 4
    assert report.differential_privacy.amplification_claimed
    document = json.dumps(report.to_json())
    validate_report(report.to_json())
    assert 'rounds_charged": 1' not in document


def test_a_damaged_trail_is_marked_not_fatal(tmp_path: Path) -> None:
    made = populate(tmp_path / "fedge.db", sim_config(), blobs=tmp_path / "blobs")
    unknown = append_raw(made.path, "future.kind", '{"node_id":7}', RUN)
    round_two = next(
        r.seq
        for r in checked_records(made.engine, run_id=RUN)
        if r.kind == "round.completed" and r.payload["round"] == 2
    )
    with sqlite3.connect(made.path) as connection:  # an edit that keeps the JSON canonical
        payload = connection.execute(
            "SELECT payload FROM audit_events WHERE seq = ?", (round_two,)
        ).fetchone()[0]
        connection.execute(
            "UPDATE audit_events SET payload = ? WHERE seq = ?",
            (payload.replace('"accuracy":0.7', '"accuracy":0.99'), round_two),
        )
    try:
        report = _report(made)
        fleet = build_fleet_report(
            made.engine,
            since=None,
            until=None,
            verification=verification_of(verify_trail(made.engine)),
        )
    finally:
        made.engine.dispose()
    assert report.summary.banner is not None and not report.summary.trail_intact
    damaged = {r.seq: r.problem for r in report.verification.damaged_records}
    assert damaged[round_two] == "its content does not match its hash"
    row = next(r for r in report.rounds if r.round == 2)
    assert row.damaged and row.accuracy is None  # a damaged record is never trusted
    assert report.verification.first_bad_seq == round_two
    kinds = {e.kind: e for e in report.security_events.events}
    assert kinds["future.kind"].category == "future (kind unknown to this fedge version)"
    assert kinds["future.kind"].seq == unknown
    assert fleet.runs[0].damaged_records == 1 and not fleet.verification.ok
    validate_report(report.to_json())
    validate_report(fleet.to_json())
    assert "The audit trail is damaged" in render_html(report)
    assert "0.99" not in render_html(report)


def test_a_fleet_summary_covers_the_period(populated: Populated) -> None:
    verification = verification_of(verify_trail(populated.engine))
    from datetime import UTC, datetime

    everything = build_fleet_report(
        populated.engine, since=None, until=None, verification=verification
    )
    later = build_fleet_report(
        populated.engine,
        since=datetime(2100, 1, 1, tzinfo=UTC),
        until=None,
        verification=verification,
    )
    assert [r.run_id for r in everything.runs] == [RUN]
    assert everything.runs[0].epsilon == PrivacyLedger(populated.engine).run_epsilon(
        RUN, delta=1e-5
    )
    assert everything.runs[0].rounds == ROUNDS and everything.total_rounds == ROUNDS
    assert later.runs == ()
    validate_report(everything.to_json())
    assert "Fleet compliance summary" in render_html(everything)
