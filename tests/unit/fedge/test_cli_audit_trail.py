"""``fedge audit checkpoint`` and ``fedge audit verify --checkpoint|--expect-head``, as run."""

from __future__ import annotations

import functools
import json
import sqlite3
from pathlib import Path

import pytest

from fedge.cli import main
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.events import JSONValue
from fl_server.db import open_database
from fl_server.ledger import RUN_SUBJECT, PrivacyLedger
from strategies.accounting import PrivacySpend


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _home_with_a_run(home: Path, rounds: int = 3) -> None:
    engine = open_database(f"sqlite:///{home / 'fedge.db'}")
    try:
        audit = AuditLog(engine)
        ledger = PrivacyLedger(engine)
        audit.append(AuditEventKind.RUN_STARTED, {"config_sha256": "ab"}, run_id="run-1")
        spend = PrivacySpend(mechanism="distributed-dgauss", rho=0.1)
        for server_round in range(1, rounds + 1):
            ledger.record_round(
                "run-1",
                server_round,
                {RUN_SUBJECT: spend, "dev-a": spend},
                delta=1e-5,
                audit=audit,
                payload=functools.partial(_payload, server_round),
            )
            audit.append(AuditEventKind.ROUND_COMPLETED, {"round": server_round}, run_id="run-1")
        audit.append(AuditEventKind.RUN_COMPLETED, {"rounds": rounds}, run_id="run-1")
    finally:
        engine.dispose()


def _payload(server_round: int, totals: dict[str, float]) -> dict[str, JSONValue]:
    return {"round": server_round, "subjects": len(totals)}


def _head(home: Path) -> tuple[int, str]:
    with sqlite3.connect(home / "fedge.db") as connection:
        seq, digest = connection.execute("SELECT seq, record_hash FROM audit_head").fetchone()
    return int(seq), str(digest)


def _cut_tail(home: Path, keep: int) -> None:
    """What a database writer does: cut records, rows and checkpoints, move the head back."""
    with sqlite3.connect(home / "fedge.db") as connection:
        (digest,) = connection.execute(
            "SELECT record_hash FROM audit_events WHERE seq = ?", (keep,)
        ).fetchone()
        connection.execute("DELETE FROM audit_events WHERE seq > ?", (keep,))
        connection.execute("DELETE FROM privacy_ledger WHERE server_round >= 2")
        connection.execute("DELETE FROM audit_checkpoints")
        connection.execute("UPDATE audit_head SET seq = ?, record_hash = ?", (keep, digest))


def test_checkpoint_exports_and_a_cut_tail_fails_against_the_file(
    capsys: pytest.CaptureFixture[str], fedge_home: Path, tmp_path: Path
) -> None:
    _home_with_a_run(fedge_home)
    kept = tmp_path / "outside" / "checkpoint.json"

    code, out, _ = _run(capsys, "audit", "checkpoint", "--out", str(kept))
    seq, digest = _head(fedge_home)
    document = json.loads(kept.read_text())
    assert code == 0
    assert f"checkpoint: record {seq}, head {digest}" in out
    assert document["checkpoint"]["seq"] == seq and len(document["record_hashes"]) == seq
    assert (fedge_home / "audit" / "checkpoint-key.pem").stat().st_mode & 0o077 == 0

    _cut_tail(fedge_home, keep=3)
    (fedge_home / "audit" / "checkpoints.jsonl").unlink()  # the attacker reached the home too
    blind_code, blind_out, _ = _run(capsys, "audit", "verify")
    code, out, err = _run(capsys, "audit", "verify", "--checkpoint", str(kept))

    assert blind_code == 0 and "warning: no signed checkpoint was checked" in blind_out
    assert code == 1
    assert "FAILED checkpoint: record 4: the chain ends at record 3" in out
    assert "its tail was cut off" in err and "at record 4" in err


def test_expect_head_must_still_be_in_the_chain(
    capsys: pytest.CaptureFixture[str], fedge_home: Path
) -> None:
    _home_with_a_run(fedge_home)
    _, digest = _head(fedge_home)

    ok, _, _ = _run(capsys, "audit", "verify", "--expect-head", digest)
    _cut_tail(fedge_home, keep=3)
    code, _, err = _run(capsys, "audit", "verify", "--expect-head", digest)
    bad, _, bad_err = _run(capsys, "audit", "verify", "--expect-head", "XYZ")

    assert ok == 0
    assert code == 1 and f"the expected head {digest} is not in the chain" in err
    assert bad == 2 and "64 lowercase hex digits" in bad_err


def test_a_checkpoint_is_never_signed_over_a_damaged_trail(
    capsys: pytest.CaptureFixture[str], fedge_home: Path
) -> None:
    _home_with_a_run(fedge_home)
    with sqlite3.connect(fedge_home / "fedge.db") as connection:
        connection.execute("UPDATE privacy_ledger SET epsilon = 0.001 WHERE subject = 'dev-a'")

    code, _, err = _run(capsys, "audit", "checkpoint")

    assert code == 1
    assert "refusing to sign a checkpoint over a trail that does not verify" in err
    assert not (fedge_home / "audit" / "checkpoints.jsonl").exists()


def test_verify_json_and_a_pinned_key(
    capsys: pytest.CaptureFixture[str], fedge_home: Path, tmp_path: Path
) -> None:
    _home_with_a_run(fedge_home)
    _run(capsys, "audit", "checkpoint")
    other = tmp_path / "other.pub"
    other.write_text("ab" * 32 + "\n")

    code, out, _ = _run(capsys, "audit", "verify", "--json")
    pinned, pinned_out, _ = _run(capsys, "audit", "verify", "--public-key", str(other))
    result = json.loads(out)

    assert code == 0 and result["ok"] is True
    assert result["checkpoint"]["source"] == "database" or result["checkpoint"][
        "source"
    ].startswith("file:")
    assert result["ledger_rows_checked"] == 6 and result["spent_events_checked"] == 3
    # Checkpoints signed by any other key than the pinned one are not evidence.
    assert pinned == 1 and "untrusted key" in pinned_out


def test_verify_creates_nothing_in_a_home(
    capsys: pytest.CaptureFixture[str], fedge_home: Path
) -> None:
    _home_with_a_run(fedge_home)

    code, _, _ = _run(capsys, "audit", "verify")

    assert code == 0
    assert not (fedge_home / "audit").exists()


def test_a_private_run_refuses_to_start_on_a_cut_trail(
    capsys: pytest.CaptureFixture[str], fedge_home: Path, fashion_dir: Path
) -> None:
    _home_with_a_run(fedge_home)
    _run(capsys, "audit", "checkpoint")
    _cut_tail(fedge_home, keep=3)  # the anchor file in the home still holds the checkpoint

    code, _, err = _run(
        capsys,
        "sim",
        "run",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--dp",
        "central",
        "--epsilon",
        "5",
        "--data-dir",
        str(fashion_dir),
    )

    assert code == 1
    assert "its tail was cut off" in err
    # Nothing was recorded: the trail still ends where the attacker left it.
    assert _head(fedge_home)[0] == 3


def test_a_legacy_ledger_is_adopted_once_and_then_bound(
    capsys: pytest.CaptureFixture[str], fedge_home: Path
) -> None:
    from sqlalchemy.orm import Session

    from fl_server.db.schema import LedgerRow

    # What fedge wrote before the ledger was bound: rows, and events without a ledger section.
    engine = open_database(f"sqlite:///{fedge_home / 'fedge.db'}")
    audit = AuditLog(engine)
    with Session(engine) as session, session.begin():
        for server_round, epsilon in ((1, 0.9), (2, 1.4)):
            for subject in (RUN_SUBJECT, "dev-a"):
                session.add(
                    LedgerRow(
                        run_id="old-run",
                        subject=subject,
                        server_round=server_round,
                        mechanism="distributed-dgauss",
                        rho=0.1,
                        noise_multiplier=None,
                        sample_rate=None,
                        steps=None,
                        delta=1e-5,
                        epsilon=epsilon,
                        recorded_at="2026-01-01T00:00:00+00:00",
                    )
                )
            audit.append(AuditEventKind.PRIVACY_SPENT, {"round": server_round}, run_id="old-run")
    refused = PrivacyLedger(engine)
    with pytest.raises(Exception, match="no audit event records"):
        refused.lifetime_spent("dev-a", delta=1e-5)

    before, before_out, _ = _run(capsys, "audit", "verify")
    code, out, _ = _run(capsys, "audit", "adopt-ledger")
    again, again_out, _ = _run(capsys, "audit", "adopt-ledger")
    after, _, _ = _run(capsys, "audit", "verify")
    adopted = PrivacyLedger(engine).lifetime_spent("dev-a", delta=1e-5)
    engine.dispose()

    assert before == 1 and "stated by no privacy.spent event" in before_out
    assert code == 0 and "adopted 4 ledger rows" in out
    assert again == 0 and "nothing to adopt" in again_out
    assert after == 0
    assert adopted > 0
