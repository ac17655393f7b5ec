"""``fedge audit report`` on a real tiny simulated secure central-DP run (Flower simulation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_server.audit.reading import checked_records
from fl_server.audit.verify import verify_trail
from fl_server.db import open_database
from fl_server.ledger import PrivacyLedger
from fl_server.reports import SECTIONS, build_run_report, verification_of
from fl_server.reports.cli import validate_report
from fl_server.reports.render_html import render_html

pytestmark = pytest.mark.slow


def test_the_report_of_a_simulated_secure_dp_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "sim",
            "run",
            "--home",
            str(home),
            "--out",
            str(tmp_path / "summary.json"),
            "--clients",
            "4",
            "--rounds",
            "2",
            "--secure-agg",
            "--secagg-dropout",
            "0",
            "--dp",
            "central",
            "--epsilon",
            "50",
            "--train-examples",
            "200",
            "--test-examples",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "FEDGE_DATA_DIR": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads((tmp_path / "summary.json").read_text())["run_id"]
    engine = open_database(f"sqlite:///{home / 'fedge.db'}", create=False)
    try:
        report = build_run_report(
            engine, run_id=run_id, verification=verification_of(verify_trail(engine))
        )
        ledger_epsilon = PrivacyLedger(engine).run_epsilon(run_id, delta=1e-5)
        rounds = [
            r.payload for r in checked_records(engine, run_id=run_id) if r.kind == "round.completed"
        ]
    finally:
        engine.dispose()
    assert ledger_epsilon is not None and ledger_epsilon > 0
    assert report.differential_privacy.epsilon_total == ledger_epsilon
    assert report.summary.epsilon == ledger_epsilon
    assert report.summary.trail_intact and report.summary.banner is None
    assert [r.round for r in report.rounds] == [p["round"] for p in rounds] == [1, 2]
    assert [r.accuracy for r in report.rounds] == [p["accuracy"] for p in rounds]
    secure = [p["secure_aggregation"] for p in rounds]
    assert [(x.sampled, x.completed) for x in report.participants.per_round] == [
        (s["sampled"], s["survivors"]) for s in secure
    ]
    assert [x.survivors for x in report.secure_aggregation.per_round] == [
        s["survivors"] for s in secure
    ]
    assert report.secure_aggregation.enabled and report.secure_aggregation.threat_model == "active"
    assert len(report.lineage.versions) == 3  # the initial model and two rounds
    validate_report(report.to_json())
    page = render_html(report)
    for heading in SECTIONS:
        assert f">{heading}</h2>" in page
