"""Verify the whole trail: the chain, its signed checkpoints, the ledger and the store against it.

:func:`verify_trail` walks the chain once and checks, in one report:

- every record's link and hash (the first bad record is named);
- the head row against the chain's last record (a cut tail with the head left behind);
- every signed checkpoint (a trusted key, a valid signature): the chain must still
  reach its record and hash there what was signed, so a cut tail with the head
  moved back, or a consistent rewrite, is named against it;
- ``--expect-head``: a head hash kept from earlier must still be in the chain;
- the privacy ledger: every row is stated by a chained ``privacy.spent`` event and
  every stated row exists, unchanged;
- the model store: every version's epsilon, in its signed manifest and in its
  searchable column, equals the run's epsilon the trail had recorded when it
  was published.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine

from fedge.errors import ConfigError
from fl_server.audit.chain import (
    ChainPosition,
    ChainWalker,
    CheckedRow,
    read_head,
    records_after,
)
from fl_server.audit.checkpoints import Checkpoint
from fl_server.audit.cross_checks import TrailProblem, ledger_problems, limited, store_problems
from fl_server.audit.events import AuditEventKind
from fl_server.ledger_binding import STATING_KINDS, Charge, ChargeKey, charges_in

__all__ = ["SourcedCheckpoint", "TrailProblem", "TrailVerification", "verify_trail"]

_RUN = "run"  # the ledger's run-level subject (fl_server.ledger.RUN_SUBJECT)
_LISTED = 20  # problems of one kind listed before "and N more"
_PUBLISHED = AuditEventKind.MODEL_PUBLISHED.value


@dataclass(frozen=True, slots=True)
class SourcedCheckpoint:
    """A checkpoint and where it was read from (the database, an anchor, a file)."""

    checkpoint: Checkpoint
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrailVerification:
    """What :func:`verify_trail` found."""

    records_checked: int
    head_seq: int
    head_hash: str
    problems: tuple[TrailProblem, ...]
    checkpoint: dict[str, Any] | None
    checkpoints_checked: int
    ledger_rows_checked: int
    spent_events_checked: int
    store_versions_checked: int
    expected_head: str | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        """The lowest record a problem names, if any."""
        seqs = [p.seq for p in self.problems if p.seq is not None]
        return min(seqs) if seqs else None

    @property
    def reason(self) -> str:
        """The first problem's message ("" when the trail verifies)."""
        return self.problems[0].message if self.problems else ""

    def to_json(self) -> dict[str, Any]:
        """Return the result as JSON values (the report's verification section)."""
        document = asdict(self)
        document["problems"] = [asdict(p) for p in self.problems]
        document["warnings"] = list(self.warnings)
        return document | {
            "ok": self.ok,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
        }


@dataclass(slots=True)
class _Timeline:
    """Per run: the newest run-level total and the worst client total, as the chain went."""

    run_total: dict[str, float] = field(default_factory=dict)
    worst_client: dict[str, float] = field(default_factory=dict)

    def fold(self, stated: Mapping[ChargeKey, Charge]) -> None:
        for key, charge in stated.items():
            if key.subject == _RUN:
                self.run_total[key.run_id] = charge.epsilon
            else:
                worst = self.worst_client.get(key.run_id, -math.inf)
                self.worst_client[key.run_id] = max(worst, charge.epsilon)

    def epsilon(self, run_id: str) -> float | None:
        # As PrivacyLedger.run_epsilon: the run's own total, else its worst client's.
        run_level = self.run_total.get(run_id)
        if run_level:
            return run_level
        return self.worst_client.get(run_id)


def _trusted_checkpoints(
    checkpoints: Sequence[SourcedCheckpoint], trusted_keys: Collection[bytes] | None
) -> tuple[list[SourcedCheckpoint], list[TrailProblem]]:
    trusted_hex = None if trusted_keys is None else {k.hex() for k in trusted_keys}
    valid: list[SourcedCheckpoint] = []
    problems: list[TrailProblem] = []
    for item in checkpoints:
        cp = item.checkpoint
        where = f"the checkpoint of record {cp.seq} signed at {cp.signed_at} ({item.source})"
        if trusted_hex is not None and cp.public_key not in trusted_hex:
            problems.append(
                TrailProblem("checkpoint", f"{where} is signed by untrusted key {cp.key_id}")
            )
        elif not cp.signature_valid():
            problems.append(TrailProblem("checkpoint", f"{where} has a bad signature: forged"))
        else:
            valid.append(item)
    by_seq: dict[int, SourcedCheckpoint] = {}
    for item in valid:
        other = by_seq.setdefault(item.checkpoint.seq, item)
        if other.checkpoint.head_hash != item.checkpoint.head_hash:
            problems.append(
                TrailProblem(
                    "checkpoint",
                    f"two signed checkpoints disagree on record {item.checkpoint.seq} "
                    f"({other.source} and {item.source}): the chain was forked",
                    item.checkpoint.seq,
                )
            )
    return valid, problems


@dataclass(slots=True)
class _Pass:
    """The state of one walk along the chain."""

    wanted: dict[int, list[SourcedCheckpoint]]
    record_hashes: Sequence[str]
    expect_head: str | None
    problems: list[TrailProblem] = field(default_factory=list)
    chain_problems: list[TrailProblem] = field(default_factory=list)
    matched: SourcedCheckpoint | None = None
    last_good_checkpoint: int = 0
    expected_charges: dict[ChargeKey, Charge] = field(default_factory=dict)
    timeline: _Timeline = field(default_factory=_Timeline)
    published: dict[tuple[str, int], tuple[int, float | None]] = field(default_factory=dict)
    expect_found: bool = False
    spent_events: int = 0
    ours: dict[int, str] = field(default_factory=dict)

    def visit(self, row: CheckedRow) -> None:
        if self.record_hashes:
            self.ours[row.seq] = row.record_hash
        if row.problem:
            self.chain_problems.append(TrailProblem("chain", row.problem, row.problem_seq))
        if row.record_hash == self.expect_head:
            self.expect_found = True
        for item in self.wanted.get(row.seq, []):
            self._checkpoint(row, item)
        if row.payload is not None and row.run_id is not None:
            self._fold(row, row.payload, row.run_id)

    def _checkpoint(self, row: CheckedRow, item: SourcedCheckpoint) -> None:
        if item.checkpoint.head_hash == row.record_hash:
            if not self.chain_problems:
                self.last_good_checkpoint = row.seq
                if self.matched is None or row.seq >= self.matched.checkpoint.seq:
                    self.matched = item
            return
        after = self.last_good_checkpoint
        where = (
            f"record {row.seq} differs from the checkpoint signed at "
            f"{item.checkpoint.signed_at} ({item.source})"
        )
        if self.chain_problems:
            # Explained by the damage already named: no new first bad record.
            self.problems.append(
                TrailProblem("checkpoint", f"{where}: the chain changed since it was signed")
            )
            return
        first = _first_rewritten(self.record_hashes, self.ours, after, row.seq)
        span = (
            f"record {first} is the first that differs from the exported hashes"
            if first is not None
            else f"the first rewritten record is among records {after + 1}..{row.seq}"
        )
        self.problems.append(
            TrailProblem(
                "checkpoint",
                f"{where}: the chain was rewritten; {span}",
                first if first is not None else after + 1,
            )
        )

    def _fold(self, row: CheckedRow, payload: Mapping[str, object], run_id: str) -> None:
        if row.kind in STATING_KINDS:
            self.spent_events += 1
            try:
                stated = charges_in(payload, run_id)
            except ConfigError as exc:
                self.chain_problems.append(
                    TrailProblem("ledger", f"record {row.seq}: {exc}", row.seq)
                )
                return
            self.expected_charges.update(stated)
            self.timeline.fold(stated)
        elif row.kind == _PUBLISHED:
            model, version = payload.get("model"), payload.get("version")
            if isinstance(model, str) and isinstance(version, int):
                self.published[(model, version)] = (row.seq, self.timeline.epsilon(run_id))

    def cut_tail(self, last_seq: int) -> list[TrailProblem]:
        found = []
        for seq, items in sorted(self.wanted.items()):
            if seq > last_seq:
                newest = items[-1]
                found.append(
                    TrailProblem(
                        "checkpoint",
                        f"the chain ends at record {last_seq} but the checkpoint signed at "
                        f"{newest.checkpoint.signed_at} ({newest.source}) names record {seq}: "
                        "its tail was cut off",
                        last_seq + 1,
                    )
                )
        if not self.expect_found:
            found.append(
                TrailProblem(
                    "head",
                    f"the expected head {self.expect_head} is not in the chain: "
                    "it was cut or rewritten",
                )
            )
        return found


def verify_trail(
    engine: Engine,
    *,
    checkpoints: Sequence[SourcedCheckpoint] = (),
    trusted_keys: Collection[bytes] | None = None,
    record_hashes: Sequence[str] = (),
    expect_head: str | None = None,
    store_public_key: bytes | None = None,
) -> TrailVerification:
    """Verify the chain, its checkpoints, the ledger and the store's epsilons (module docstring).

    Parameters
    ----------
    checkpoints
        Checkpoints from every source the caller trusts to keep them.
    trusted_keys
        Raw Ed25519 public keys whose checkpoints count; ``None`` accepts any
        validly signed checkpoint (its key is shown in the result).
    record_hashes
        Record hashes exported with a checkpoint (record 1 first): when a
        rewrite is found, the first record whose hash differs is named.
    expect_head
        A head hash kept from earlier: the chain must still hold that record.
    store_public_key
        The store's key: with it each version's manifest signature is checked too.

    Raises
    ------
    StorageError
        If the database cannot be read.
    """
    valid, checkpoint_problems = _trusted_checkpoints(checkpoints, trusted_keys)
    wanted: dict[int, list[SourcedCheckpoint]] = {}
    for item in valid:
        wanted.setdefault(item.checkpoint.seq, []).append(item)
    walk = _Pass(wanted, record_hashes, expect_head, expect_found=expect_head is None)
    head = read_head(engine)  # first: records appended while we walk are the next walk's
    walker = ChainWalker(engine)
    last_seq, last_hash, checked = 0, walker.position.record_hash, 0
    for row in walker.walk(upto=None if head is None else head.seq):
        checked += 1
        last_seq, last_hash = row.seq, row.record_hash
        walk.visit(row)
    problems = [
        *limited(walk.chain_problems, "chain"),
        *checkpoint_problems,
        *walk.problems,
        *_head_problems(engine, head, last_seq, last_hash, checked),
        *walk.cut_tail(last_seq),
    ]
    rows_checked, ledger_found = ledger_problems(engine, walk.expected_charges)
    versions_checked, store_found = store_problems(engine, walk.published, store_public_key)
    warnings = []
    if not valid:
        warnings.append(
            "no signed checkpoint was checked: a consistent rewrite of the whole chain, or a "
            "cut tail with the head moved back, cannot be detected without one"
        )
    matched = walk.matched
    return TrailVerification(
        records_checked=checked,
        head_seq=last_seq,
        head_hash=last_hash,
        problems=tuple(problems + ledger_found + store_found),
        checkpoint=None
        if matched is None
        else matched.checkpoint.to_json() | {"source": matched.source},
        checkpoints_checked=len(valid),
        ledger_rows_checked=rows_checked,
        spent_events_checked=walk.spent_events,
        store_versions_checked=versions_checked,
        expected_head=expect_head,
        warnings=tuple(warnings),
    )


def _first_rewritten(
    exported: Sequence[str], ours: Mapping[int, str], after: int, upto: int
) -> int | None:
    """Return the first record in (after, upto] whose hash differs from the exported list."""
    if len(exported) < upto:
        return None
    for seq in range(after + 1, upto + 1):
        if ours.get(seq) != exported[seq - 1]:
            return seq
    return None


def _head_problems(
    engine: Engine, head: ChainPosition | None, last_seq: int, last_hash: str, checked: int
) -> list[TrailProblem]:
    if head is None:
        return [TrailProblem("head", "the head row is missing", last_seq + 1)]
    if head.seq > last_seq:
        return [
            TrailProblem(
                "head",
                f"the head names record {head.seq} but the chain ends at record {last_seq}: "
                "records were removed from the end",
                last_seq + 1,
            )
        ]
    if (head.seq, head.record_hash) != (last_seq, last_hash):
        return [
            TrailProblem(
                "head",
                f"the head (record {head.seq}) does not match the chain's last record "
                f"({last_seq}, {checked} records read)",
                head.seq + 1,
            )
        ]
    if records_after(engine, head.seq):
        moved = read_head(engine)
        if moved is not None and moved.seq == head.seq:
            # Nobody appended since the head was read: the records past it were left behind.
            return [
                TrailProblem(
                    "head",
                    f"records lie after the head (record {head.seq}): the head was moved back",
                    head.seq + 1,
                )
            ]
    return []
