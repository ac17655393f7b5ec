"""The trail's cross-checks: the privacy ledger and the model store against the chain's events."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edge_runtime.manifest import ManifestInvalid, SignedManifest, verify_manifest
from fedge.errors import ConfigError, StorageError
from fl_server.db.schema import LedgerRow, ModelVersionRow
from fl_server.ledger_binding import Charge, ChargeKey, charge_of_row

__all__ = ["TrailProblem", "ledger_problems", "limited", "store_problems"]

_LISTED = 20  # problems of one kind listed before "and N more"


@dataclass(frozen=True, slots=True)
class TrailProblem:
    """One thing that does not verify: what part, which record (if one), and why."""

    part: str  # "chain", "head", "checkpoint", "ledger", "store"
    message: str
    seq: int | None = None


def limited(problems: list[TrailProblem], part: str) -> list[TrailProblem]:
    """Return the first problems of one kind and a line counting the rest."""
    if len(problems) <= _LISTED:
        return problems
    rest = len(problems) - _LISTED
    return [*problems[:_LISTED], TrailProblem(part, f"... and {rest} more {part} problems")]


def ledger_problems(
    engine: Engine, expected: Mapping[ChargeKey, Charge]
) -> tuple[int, list[TrailProblem]]:
    """Compare every ledger row with the charges the chain's events state.

    Returns
    -------
    tuple
        The rows read, and each row deleted, edited or inserted.

    Raises
    ------
    StorageError
        If the ledger cannot be read.
    """
    remaining = dict(expected)
    problems: list[TrailProblem] = []
    checked = 0
    try:
        with Session(engine) as session:
            for row in session.scalars(select(LedgerRow).order_by(LedgerRow.id)):
                checked += 1
                key, charge = charge_of_row(row)
                where = (
                    f"ledger row {row.id} ({key.subject}, round {key.server_round}, "
                    f"run {key.run_id})"
                )
                stated = remaining.pop(key, None)
                if stated is None:
                    problems.append(
                        TrailProblem(
                            "ledger",
                            f"{where} is stated by no privacy.spent event: inserted (or written "
                            "by a fedge older than the bound ledger: `fedge audit adopt-ledger`)",
                        )
                    )
                elif stated != charge:
                    problems.append(
                        TrailProblem(
                            "ledger", f"{where} differs from its privacy.spent event: edited"
                        )
                    )
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the privacy ledger: {exc}") from exc
    for key in remaining:
        problems.append(
            TrailProblem(
                "ledger",
                f"the row of {key.subject} in round {key.server_round} of run {key.run_id} is "
                "missing from the ledger: deleted",
            )
        )
    return checked, limited(problems, "ledger")


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def store_problems(
    engine: Engine,
    published: Mapping[tuple[str, int], tuple[int, float | None]],
    public_key: bytes | None,
) -> tuple[int, list[TrailProblem]]:
    """Check each version's epsilon: column against signed manifest, manifest against the trail.

    ``published`` maps (model, version) to its ``store.published`` record and the
    run's epsilon the trail held then; with ``public_key`` each manifest's
    signature is checked too.

    Raises
    ------
    StorageError
        If the store's index cannot be read.
    """
    problems: list[TrailProblem] = []
    checked = 0
    try:
        with Session(engine) as session:
            rows = list(session.scalars(select(ModelVersionRow).order_by(ModelVersionRow.id)))
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the model store: {exc}") from exc
    for row in rows:
        checked += 1
        name = f"{row.model} v{row.version}"
        try:
            signed = SignedManifest.from_json(json.loads(row.manifest))
            manifest = signed.manifest
            if public_key is not None:
                verify_manifest(signed, public_key)
        except (ValueError, ConfigError, ManifestInvalid) as exc:
            problems.append(
                TrailProblem("store", f"{name}: its signed manifest does not verify ({exc})")
            )
            continue
        signed_epsilon = manifest.metadata.get("dp_epsilon")
        if (manifest.model, manifest.version) != (row.model, row.version):
            problems.append(
                TrailProblem(
                    "store",
                    f"{name} holds the signed manifest of {manifest.model} v{manifest.version}",
                )
            )
        if not _close(row.dp_epsilon, signed_epsilon):
            problems.append(
                TrailProblem(
                    "store",
                    f"{name}: its epsilon column ({row.dp_epsilon}) differs from its signed "
                    f"manifest ({signed_epsilon}): edited",
                )
            )
        event = published.get((row.model, row.version))
        if event is None:
            if row.run_id is not None:
                problems.append(
                    TrailProblem(
                        "store", f"{name} of run {row.run_id} has no store.published event"
                    )
                )
            continue
        seq, trail_epsilon = event
        if row.run_id is not None and not _close(signed_epsilon, trail_epsilon):
            problems.append(
                TrailProblem(
                    "store",
                    f"{name}: its signed epsilon ({signed_epsilon}) differs from the run's epsilon "
                    f"in the trail when it was published ({trail_epsilon}, record {seq})",
                    seq,
                )
            )
    return checked, limited(problems, "store")
