"""A run's JSON summary, rewritten atomically after every round."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError, StorageError
from fedge.version import code_version
from fl_server.federation import RoundReport

__all__ = ["RunStatus", "RunSummary", "SummaryWriter", "write_json_atomically"]


class RunStatus:
    """The values of a summary's ``status`` (stable strings other tools read)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    BUDGET_EXHAUSTED = "budget-exhausted"


@dataclass(slots=True)
class RunSummary:
    """The run's record: configuration, data, one entry per round, outcome."""

    run_id: str
    config: dict[str, Any]
    config_sha256: str
    data: dict[str, Any]
    db_url: str
    status: str = RunStatus.RUNNING
    initial_accuracy: float | None = None
    initial_loss: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    audit_head: str | None = None
    error: str | None = None
    privacy: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> RunSummary:
        """Return the summary a previous process wrote (to resume its run).

        Raises
        ------
        ConfigError
            If the document is not a fedge run summary.
        """
        try:
            rounds = document["rounds"]
            if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
                raise TypeError("rounds must be a list of objects")
            return cls(
                run_id=str(document["run_id"]),
                config=dict(document["config"]),
                config_sha256=str(document["config_sha256"]),
                data=dict(document["data"]),
                db_url=str(document["audit"]["db_url"]),
                status=str(document["status"]),
                initial_accuracy=document["initial_accuracy"],
                initial_loss=document.get("initial_loss"),
                rounds=rounds,
                wall_seconds=float(document["wall_seconds"]),
                audit_head=document["audit"]["head_hash"],
                error=document["error"],
                privacy=document["privacy"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a fedge run summary: {exc}") from None

    @property
    def final_accuracy(self) -> float | None:
        """The accuracy of the last round's global model."""
        return self.rounds[-1]["accuracy"] if self.rounds else None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document written to disk."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "final_accuracy": self.final_accuracy,
            "initial_accuracy": self.initial_accuracy,
            "initial_loss": self.initial_loss,
            "rounds": self.rounds,
            "config": self.config,
            "config_sha256": self.config_sha256,
            "data": self.data,
            "wall_seconds": round(self.wall_seconds, 3),
            "audit": {"db_url": self.db_url, "head_hash": self.audit_head},
            "code_version": code_version(),
            "error": self.error,
            "privacy": self.privacy,
        }


def write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` through a fsynced temporary file and a rename.

    Raises
    ------
    StorageError
        If the file cannot be written.
    """
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise StorageError(f"cannot write summary {path}: {exc}") from exc


class SummaryWriter:
    """Keeps the summary file current: one atomic rewrite per round (a round observer)."""

    def __init__(
        self,
        summary: RunSummary,
        path: Path,
        started: float,
        versions: dict[int, int] | None = None,
        epsilon: Callable[[], float | None] | None = None,
    ) -> None:
        self.summary = summary
        self._path = path
        self._started = started
        self._versions = versions if versions is not None else {}
        self._epsilon = epsilon

    def on_round(self, report: RoundReport) -> None:
        """Record a finished round (round 0: the initial model's accuracy) and rewrite the file."""
        if report.server_round == 0:
            self.summary.initial_accuracy = report.accuracy
            self.summary.initial_loss = report.loss
        else:
            sampled = report.sampled
            self.summary.rounds.append(
                {
                    "round": report.server_round,
                    "accuracy": report.accuracy,
                    "loss": report.loss,
                    "seconds": round(report.seconds, 3),
                    "replies": report.num_replies,
                    "failures": report.num_failures,
                    # As the round.completed event counts them (see fl_server.federation).
                    "sampled": sampled,
                    "completed": report.num_replies,
                    "dropped": None if sampled is None else max(sampled - report.num_replies, 0),
                    "refused": dict(report.refused),
                    "epsilon": None if self._epsilon is None else self._epsilon(),
                    "model_sha256": report.model_sha256,
                    "model_path": report.model_path,
                    "secure_aggregation": report.secure_aggregation,
                    "store_version": self._versions.get(report.server_round),
                }
            )
        self.flush()

    def flush(self) -> None:
        """Rewrite the summary file with the wall time so far."""
        self.summary.wall_seconds = time.perf_counter() - self._started
        write_json_atomically(self._path, self.summary.to_json())
