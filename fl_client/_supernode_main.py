"""``python -m fl_client._supernode_main ARGS``: Flower's SuperNode with shorter waits.

For fedge's own tests only. Flower's SuperNode (``flwr.supernode.start_client_internal``)
sleeps a hard-coded 3 s whenever a pull from the SuperLink finds no message, and 0.5 s
between checks for the ClientApp's reply: every message of a round waits up to that long
before a device sees it. While the SuperLink is down it retries with an exponential
backoff of up to 20 s (``flwr.supercore.retry.http_retry``), so a device comes back up to
20 s after a restarted server. A deployment test spends most of its time in these waits.

:func:`fl_client.supernode.start_supernode` runs this module instead of
``flower-supernode`` only when ``FEDGE_TEST_SUPERNODE_POLL_S`` is set in the environment
(the integration tests set it); every sleep of that Flower module and every reconnection
backoff is then capped at that many seconds. Nothing else changes: the arguments are
``flower-supernode``'s own. A production deployment never sets the variable and runs
``flower-supernode`` itself.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

POLL_ENV = "FEDGE_TEST_SUPERNODE_POLL_S"
"""Seconds the SuperNode waits at most between two requests (tests only)."""


class _CappedTime:
    """Stands in for the ``time`` module inside one Flower module: ``sleep`` is capped."""

    def __init__(self, cap_s: float) -> None:
        self._cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def poll_cap(environ: Mapping[str, str]) -> float | None:
    """Return the cap ``FEDGE_TEST_SUPERNODE_POLL_S`` asks for, or None when unset or blank.

    Raises
    ------
    ValueError
        If the value is not a positive, finite number of seconds.
    """
    raw = environ.get(POLL_ENV, "").strip()
    if not raw:
        return None
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError(f"{POLL_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def cap_sleeps(module: ModuleType, cap_s: float) -> None:
    """Cap every ``time.sleep`` that ``module`` makes at ``cap_s`` seconds."""
    module.time = _CappedTime(cap_s)  # type: ignore[attr-defined]


def cap_retry_backoff(module: ModuleType, cap_s: float) -> None:
    """Cap the reconnection backoff of Flower's retry ``module`` (its ``MAX_RETRY_DELAY``)."""
    module.MAX_RETRY_DELAY = min(module.MAX_RETRY_DELAY, cap_s)  # type: ignore[attr-defined]


def main() -> int:
    """Run ``flower-supernode`` with the arguments given, its waits capped."""
    from flwr.supercore.retry import http_retry
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    cap = poll_cap(os.environ)
    if cap is not None:
        cap_sleeps(start_client_internal, cap)
        cap_retry_backoff(http_retry, cap)
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a process by start_supernode
    sys.exit(main())
