"""Where a device records why it refused or left a round: one fsynced JSON line per refusal.

The error reply tells the server; the device keeps its own record too, so an
operator (or an audit of the device) can see every request it turned down and
why, whatever the server later claims.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from flwr.app import Context

from edge_runtime.durable import append_synced
from fedge.errors import StorageError
from fl_client.budget import device_name

__all__ = ["RefusalLog", "RefusalRecorder", "ignore_refusal", "read_refusals"]

logger = logging.getLogger(__name__)

_MAX_REASON = 500


class RefusalRecorder(Protocol):
    """Told why the device refused or left a round."""

    def __call__(self, context: Context, source: str, reason: str) -> None:
        """Record that ``source`` (a mod and stage) refused because of ``reason``."""
        ...


def ignore_refusal(context: Context, source: str, reason: str) -> None:
    """Record nothing (the refusal is still logged and answered with an error)."""
    del context, source, reason


def read_refusals(path: Path) -> list[dict[str, str]]:
    """Return the refusals recorded in ``path``, oldest first (none if it does not exist).

    A torn last line (a crash while appending) and damaged lines are skipped:
    the log is a record for people, not an input to any decision.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read the refusal log {path}: {exc}") from exc
    out = []
    for line in lines[:-1]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append({str(k): str(v) for k, v in entry.items()})
    return out


class RefusalLog:
    """Append each refusal to ``<directory>/refusals-<device>.jsonl`` (fsynced).

    A write failure is logged, never raised: the refusal stands either way.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, context: Context) -> Path:
        """Return the file of the device running ``context``."""
        return self.directory / f"refusals-{device_name(context)}.jsonl"

    def entries(self, context: Context) -> list[dict[str, str]]:
        """Return the recorded refusals of a device, oldest first (a torn last line dropped)."""
        return read_refusals(self.path_for(context))

    def __call__(self, context: Context, source: str, reason: str) -> None:
        """Append one refusal."""
        line = {
            "at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "source": source,
            "reason": reason[:_MAX_REASON],
        }
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        try:
            path = self.path_for(context)
            path.parent.mkdir(parents=True, exist_ok=True)
            append_synced(path, data)
        except (OSError, StorageError) as exc:
            logger.error("cannot record a refusal in %s: %s", self.directory, exc)
