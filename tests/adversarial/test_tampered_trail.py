"""A hostile database writer against the audit trail, the ledger and the store's epsilons.

The attacker can run any SQL (SQLite and PostgreSQL alike) and compute SHA-256,
but holds neither the checkpoint key nor the anchor file. Every edit is
detected against a signed checkpoint at the right record, and no edit ever
re-opens a privacy budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from fedge.errors import AuditIntegrityError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.anchors import load_checkpoint_file, write_checkpoint_file
from fl_server.audit.checkpoints import (
    CheckpointSigner,
)
from fl_server.audit.events import (
    GENESIS_HASH,
    JSONValue,
    canonical_json,
    parse_canonical,
    record_hash,
)
from fl_server.audit.trust import AuditTrust, Checkpointer, trusted
from fl_server.audit.verify import SourcedCheckpoint, TrailVerification, verify_trail
from fl_server.db.schema import (
    AuditCheckpointRow,
    AuditHeadRow,
    AuditRecordRow,
    LedgerRow,
    ModelVersionRow,
)
from fl_server.ledger import RUN_SUBJECT, BudgetExceeded, PrivacyLedger
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.records import NewArtefact, VersionInfo
from fl_server.store.store import ModelStore
from strategies.accounting import PrivacySpend

RUN = "run-t"
DELTA = 1e-5
ROUNDS = 4
SPEND = PrivacySpend(mechanism="distributed-dgauss", rho=0.05)
BUDGET = 3.0


def _round(ledger: PrivacyLedger, audit: AuditLog, server_round: int) -> dict[str, float]:
    spends = {RUN_SUBJECT: SPEND, "dev-a": SPEND, "dev-b": SPEND}

    def payload(totals: dict[str, float]) -> dict[str, JSONValue]:
        return {"round": server_round, "mechanism": SPEND.mechanism, "epsilon": totals["run"]}

    return ledger.record_round(RUN, server_round, spends, delta=DELTA, audit=audit, payload=payload)


@pytest.fixture
def trail(engine: Engine, tmp_path: Path) -> AuditTrust:
    """A run of four rounds: ledger rows, events, store versions, and a checkpoint at its end."""
    audit = AuditLog(engine)
    trust = AuditTrust(tmp_path / "audit")
    checkpointer = Checkpointer(engine, trust, interval=6)
    ledger = PrivacyLedger(engine)
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate(), audit=audit)
    audit.append(AuditEventKind.RUN_STARTED, {"config": {"rounds": ROUNDS}}, run_id=RUN)
    for server_round in range(1, ROUNDS + 1):
        totals = _round(ledger, audit, server_round)
        store.publish(
            "cnn",
            [NewArtefact(name="weights.npz", data=f"w{server_round}".encode())],
            parent=server_round - 1 or None,
            info=VersionInfo(run_id=RUN, server_round=server_round, dp_epsilon=totals["run"]),
        )
        audit.append(AuditEventKind.ROUND_COMPLETED, {"round": server_round}, run_id=RUN)
        checkpointer.on_round(None)
    audit.append(AuditEventKind.RUN_COMPLETED, {"rounds": ROUNDS}, run_id=RUN)
    checkpointer.checkpoint("run-end")
    return trust


def _verify(engine: Engine, trust: AuditTrust, **options: object) -> TrailVerification:
    found, problems = trust.checkpoints(engine)
    assert not problems
    key = trust.trusted_key()
    assert key is not None
    return verify_trail(engine, checkpoints=found, trusted_keys=[key], **options)  # type: ignore[arg-type]


def _anchor_only(engine: Engine, trust: AuditTrust) -> TrailVerification:
    """What survives an attacker who also emptied the database's checkpoint table."""
    anchored, _ = trust.anchor.read()
    key = trust.trusted_key()
    assert key is not None
    return verify_trail(
        engine,
        checkpoints=[SourcedCheckpoint(c, "anchor") for c in anchored],
        trusted_keys=[key],
    )


def _sql(engine: Engine, *statements: object) -> None:
    with Session(engine) as session, session.begin():
        for statement in statements:
            session.execute(statement)  # type: ignore[call-overload]


def _cut_tail(engine: Engine, cut: int, *also: object) -> None:
    """Delete records from ``cut`` on, move the head back to the record before, empty the
    database's checkpoint table, and run ``also`` (matching edits), in one transaction."""
    with Session(engine) as session:
        keep = session.get(AuditRecordRow, cut - 1)
        assert keep is not None
        keep_hash = keep.record_hash
    _sql(
        engine,
        delete(AuditRecordRow).where(AuditRecordRow.seq >= cut),
        update(AuditHeadRow).values(seq=cut - 1, record_hash=keep_hash),
        delete(AuditCheckpointRow),
        *also,
    )


def _seq_of(engine: Engine, kind: AuditEventKind, nth: int = 1) -> int:
    with Session(engine) as session:
        seqs = list(
            session.scalars(
                select(AuditRecordRow.seq)
                .where(AuditRecordRow.kind == kind.value)
                .order_by(AuditRecordRow.seq)
            )
        )
    return seqs[nth - 1]


def _rewrite(engine: Engine, change: Callable[[dict[str, object], str], dict[str, object]]) -> int:
    """Rewrite the whole chain consistently (new payloads, every hash recomputed, head moved).

    Returns the first record whose content changed.
    """
    first_changed = 0
    with Session(engine) as session, session.begin():
        rows = list(session.scalars(select(AuditRecordRow).order_by(AuditRecordRow.seq)))
        prev = GENESIS_HASH
        for row in rows:
            payload = parse_canonical(row.payload)
            assert isinstance(payload, dict)
            new_payload = canonical_json(change(payload, row.kind))
            if new_payload != row.payload and not first_changed:
                first_changed = row.seq
            digest = record_hash(
                seq=row.seq,
                recorded_at=row.recorded_at,
                kind=row.kind,
                run_id=row.run_id,
                payload_json=new_payload,
                prev_hash=prev,
            )
            row.payload, row.prev_hash, row.record_hash = new_payload, prev, digest
            prev = digest
        head = session.get(AuditHeadRow, 1)
        assert head is not None
        head.record_hash = prev
    return first_changed


def _divide_epsilons(payload: dict[str, object], kind: str) -> dict[str, object]:
    if kind != AuditEventKind.PRIVACY_SPENT.value:
        return payload
    section = dict(payload["ledger"])  # type: ignore[call-overload]
    section["totals"] = {k: v / 10 for k, v in section["totals"].items()}
    return {**payload, "epsilon": payload["epsilon"] / 10, "ledger": section}  # type: ignore[operator]


def test_an_untouched_trail_verifies_against_its_checkpoints(
    engine: Engine, trail: AuditTrust
) -> None:
    result = _verify(engine, trail)

    assert result.ok, result.problems
    assert result.checkpoint is not None
    assert result.checkpoint["seq"] == result.head_seq
    assert result.checkpoint["reason"] == "run-end"
    assert result.ledger_rows_checked == 3 * ROUNDS
    assert result.spent_events_checked == ROUNDS
    assert result.store_versions_checked == ROUNDS
    assert not result.warnings


def test_an_edited_record_is_named(engine: Engine, trail: AuditTrust) -> None:
    seq = _seq_of(engine, AuditEventKind.ROUND_COMPLETED, 2)
    _sql(
        engine,
        update(AuditRecordRow).where(AuditRecordRow.seq == seq).values(payload='{"round":9}'),
    )

    result = _verify(engine, trail)

    assert not result.ok
    assert result.first_bad_seq == seq
    assert "was modified" in result.reason


def test_a_deleted_middle_record_is_named(engine: Engine, trail: AuditTrust) -> None:
    seq = _seq_of(engine, AuditEventKind.ROUND_COMPLETED, 2)
    _sql(engine, delete(AuditRecordRow).where(AuditRecordRow.seq == seq))

    result = _verify(engine, trail)

    assert result.first_bad_seq == seq
    assert f"record {seq} is missing" in result.reason


def test_an_inserted_record_is_named(engine: Engine, trail: AuditTrust) -> None:
    # Make room by shifting the tail up by one, then insert a forged record at seq.
    seq = _seq_of(engine, AuditEventKind.ROUND_COMPLETED, 3)
    with Session(engine) as session, session.begin():
        rows = list(
            session.scalars(
                select(AuditRecordRow)
                .where(AuditRecordRow.seq >= seq)
                .order_by(AuditRecordRow.seq.desc())
            )
        )
        for row in rows:
            row.seq += 1
            session.flush()
        session.add(
            AuditRecordRow(
                seq=seq,
                recorded_at=rows[-1].recorded_at,
                kind="round.completed",
                run_id=RUN,
                payload='{"round":99}',
                prev_hash=rows[-1].prev_hash,
                record_hash="f" * 64,
            )
        )

    result = _verify(engine, trail)

    assert result.first_bad_seq == seq


def test_reordered_records_are_named(engine: Engine, trail: AuditTrust) -> None:
    a = _seq_of(engine, AuditEventKind.ROUND_COMPLETED, 1)
    b = _seq_of(engine, AuditEventKind.ROUND_COMPLETED, 2)
    _sql(
        engine,
        update(AuditRecordRow).where(AuditRecordRow.seq == a).values(seq=-1),
        update(AuditRecordRow).where(AuditRecordRow.seq == b).values(seq=a),
        update(AuditRecordRow).where(AuditRecordRow.seq == -1).values(seq=b),
    )

    result = _verify(engine, trail)

    assert result.first_bad_seq == a


def test_a_cut_tail_with_the_head_moved_back_fails_against_the_checkpoint(
    engine: Engine, trail: AuditTrust
) -> None:
    cut = _seq_of(engine, AuditEventKind.PRIVACY_SPENT, 3)
    _cut_tail(
        engine,
        cut,
        delete(LedgerRow).where(LedgerRow.server_round >= 3),
        delete(ModelVersionRow).where(ModelVersionRow.version >= 3),
    )

    without = verify_trail(engine)
    result = _anchor_only(engine, trail)

    # Without a checkpoint the cut is invisible, and says so.
    assert without.ok and "no signed checkpoint" in without.warnings[0]
    assert not result.ok
    assert result.first_bad_seq == cut
    assert "its tail was cut off" in result.reason


def test_records_left_after_a_head_moved_back_are_named(engine: Engine, trail: AuditTrust) -> None:
    with Session(engine) as session:
        head = session.get(AuditHeadRow, 1)
        assert head is not None
        back = session.get(AuditRecordRow, head.seq - 2)
        assert back is not None
        seq, digest = back.seq, back.record_hash
    _sql(engine, update(AuditHeadRow).values(seq=seq, record_hash=digest))

    result = _verify(engine, trail)

    assert result.first_bad_seq == seq + 1
    assert any("records lie after the head" in p.message for p in result.problems)


def test_a_trail_deleted_whole_with_its_head_reset_fails(engine: Engine, trail: AuditTrust) -> None:
    _sql(
        engine,
        delete(AuditRecordRow),
        delete(LedgerRow),
        delete(ModelVersionRow),
        delete(AuditCheckpointRow),
        update(AuditHeadRow).values(seq=0, record_hash=GENESIS_HASH),
    )

    result = _anchor_only(engine, trail)

    assert not result.ok
    assert result.first_bad_seq == 1
    assert "its tail was cut off" in result.reason


def test_a_consistent_rewrite_is_named_at_its_first_record_with_an_exported_checkpoint(
    engine: Engine, trail: AuditTrust, tmp_path: Path
) -> None:
    anchored, _ = trail.anchor.read()
    newest = anchored[-1]
    with Session(engine) as session:
        hashes = list(
            session.scalars(select(AuditRecordRow.record_hash).order_by(AuditRecordRow.seq))
        )
    exported = tmp_path / "kept-by-compliance.json"
    write_checkpoint_file(exported, newest, hashes)
    # Every epsilon divided by ten, every hash recomputed, the rows and the store edited to match.
    first = _rewrite(engine, _divide_epsilons)
    _sql(
        engine,
        update(LedgerRow).values(epsilon=LedgerRow.epsilon / 10),
        update(ModelVersionRow).values(dp_epsilon=ModelVersionRow.dp_epsilon / 10),
        delete(AuditCheckpointRow),
    )
    checkpoint, record_hashes = load_checkpoint_file(exported)

    chain_only = verify_trail(engine)
    result = verify_trail(
        engine,
        checkpoints=[SourcedCheckpoint(checkpoint, "file")],
        trusted_keys=[bytes.fromhex(checkpoint.public_key)],
        record_hashes=record_hashes,
    )

    assert first == _seq_of(engine, AuditEventKind.PRIVACY_SPENT, 1)
    assert not any(p.part in ("chain", "head", "ledger") for p in chain_only.problems)
    assert not result.ok
    assert result.first_bad_seq == first
    assert f"record {first} is the first that differs" in result.reason
    # The signed store manifests still carry the true epsilon: the rewrite shows there too.
    assert any(p.part == "store" for p in chain_only.problems)


def test_a_rewrite_without_exported_hashes_is_bounded_by_the_checkpoints(
    engine: Engine, trail: AuditTrust
) -> None:
    first = _rewrite(engine, _divide_epsilons)

    result = _verify(engine, trail)

    assert not result.ok
    problem = next(p for p in result.problems if p.part == "checkpoint")
    assert "the chain was rewritten" in problem.message
    assert problem.seq is not None and problem.seq <= first


@pytest.mark.parametrize("change", ["delete", "edit", "insert"])
def test_ledger_rows_tampered_are_detected_and_never_reopen_a_budget(
    engine: Engine, trail: AuditTrust, change: str
) -> None:
    ledger = PrivacyLedger(engine)
    honest = ledger.lifetime_spent("dev-a", delta=DELTA)
    if change == "delete":
        statement: object = delete(LedgerRow).where(LedgerRow.subject == "dev-a")
    elif change == "edit":
        statement = (
            update(LedgerRow).where(LedgerRow.subject == "dev-a").values(rho=0.0001, epsilon=0.01)
        )
    else:
        statement = update(LedgerRow).where(LedgerRow.subject == "dev-b").values(subject="dev-c")
    _sql(engine, statement)

    result = _verify(engine, trail)
    fresh = PrivacyLedger(
        engine, checkpoints=trusted(trail.checkpoints(engine)[0], trail.trusted_key() or b"")
    )

    assert not result.ok
    assert all(p.part == "ledger" for p in result.problems)
    assert {"delete": "deleted", "edit": "edited", "insert": "inserted"}[change] in result.reason
    with pytest.raises(AuditIntegrityError):
        fresh.check_lifetime(["dev-a", "dev-b", "dev-c"], SPEND, budget=BUDGET, delta=DELTA)
    with pytest.raises(AuditIntegrityError):
        fresh.lifetime_spent("dev-c" if change == "insert" else "dev-a", delta=DELTA)
    assert honest > 0


def test_a_budget_is_checked_against_the_events_not_the_rows(
    engine: Engine, trail: AuditTrust
) -> None:
    ledger = PrivacyLedger(engine)
    spent = ledger.lifetime_spent("dev-a", delta=DELTA)
    # The honest total already exceeds a budget of `spent`: one more round is refused.
    with pytest.raises(BudgetExceeded):
        ledger.check_lifetime(["dev-a"], SPEND, budget=spent, delta=DELTA)
    # Cutting the privacy.spent events off the tail (rows too) is caught by the checkpoint.
    cut = _seq_of(engine, AuditEventKind.PRIVACY_SPENT, 1)
    _cut_tail(engine, cut, delete(LedgerRow))
    anchored, _ = trail.anchor.read()
    after_cut = PrivacyLedger(engine, checkpoints=anchored)

    with pytest.raises(AuditIntegrityError, match="its tail was cut off"):
        after_cut.check_lifetime(["dev-a"], SPEND, budget=spent, delta=DELTA)


def test_a_duplicated_key_in_a_payload_is_damage(engine: Engine, trail: AuditTrust) -> None:
    seq = _seq_of(engine, AuditEventKind.ROUND_COMPLETED, 1)
    with Session(engine) as session:
        row = session.get(AuditRecordRow, seq)
        assert row is not None
        forged = row.payload.replace('{"round":1', '{"round":7,"round":1')
    _sql(engine, update(AuditRecordRow).where(AuditRecordRow.seq == seq).values(payload=forged))

    result = _verify(engine, trail)

    assert result.first_bad_seq == seq
    assert "duplicate key 'round'" in result.reason


def test_an_epsilon_column_edited_in_the_store_is_detected(
    engine: Engine, trail: AuditTrust
) -> None:
    _sql(
        engine, update(ModelVersionRow).where(ModelVersionRow.version == 2).values(dp_epsilon=0.001)
    )

    result = _verify(engine, trail)

    assert [p.part for p in result.problems] == ["store"]
    assert "cnn v2: its epsilon column" in result.reason


def test_a_checkpoint_forged_with_another_key_is_not_evidence(
    engine: Engine, trail: AuditTrust, tmp_path: Path
) -> None:
    first = _rewrite(engine, _divide_epsilons)
    forger = CheckpointSigner.load_or_create(tmp_path / "forger.pem")
    with Session(engine) as session:
        head = session.get(AuditHeadRow, 1)
        assert head is not None
        forged = forger.sign(head.seq, head.record_hash, reason="run-end")
    _sql(engine, delete(AuditCheckpointRow))
    with Session(engine) as session, session.begin():
        session.add(
            AuditCheckpointRow(
                seq=forged.seq,
                head_hash=forged.head_hash,
                signed_at=forged.signed_at,
                reason=forged.reason,
                public_key=forged.public_key,
                signature=forged.signature,
            )
        )

    result = _verify(engine, trail)

    assert first > 0
    assert any("untrusted key" in p.message for p in result.problems)
    assert any("the chain was rewritten" in p.message for p in result.problems)


def test_a_listing_of_a_tampered_ledger_fails_instead_of_printing_forged_numbers(
    engine: Engine, trail: AuditTrust
) -> None:
    _sql(engine, update(LedgerRow).where(LedgerRow.subject == RUN_SUBJECT).values(epsilon=0.001))

    with pytest.raises(AuditIntegrityError, match="edited"):
        PrivacyLedger(engine).entries(RUN)


def test_checkpoint_file_round_trips(trail: AuditTrust, engine: Engine, tmp_path: Path) -> None:
    anchored, _ = trail.anchor.read()
    with Session(engine) as session:
        hashes = list(
            session.scalars(select(AuditRecordRow.record_hash).order_by(AuditRecordRow.seq))
        )
    path = tmp_path / "cp.json"
    write_checkpoint_file(path, anchored[-1], hashes)

    checkpoint, loaded = load_checkpoint_file(path)

    assert checkpoint == anchored[-1] and checkpoint.signature_valid()
    assert loaded == hashes
    document = json.loads(path.read_text())
    document["checkpoint"]["seq"] += 1
    path.write_text(json.dumps(document))
    with pytest.raises(Exception, match="record hashes do not end"):
        load_checkpoint_file(path)
