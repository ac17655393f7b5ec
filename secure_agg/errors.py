"""Errors of the secure-aggregation protocol.

Notes
-----
Cryptographic failures are deliberately opaque: a share that fails to decrypt,
a bad signature and a forged certificate all raise :class:`CryptoError` with
the same message, so an attacker probing a client learns nothing about *which*
check failed.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedge.errors import FedgeError

__all__ = ["CryptoError", "InvalidMessage", "PolicyViolation", "ProtocolAbort"]


class CryptoError(FedgeError):
    """A decryption, signature or certificate check failed (which one is not said)."""

    def __init__(self) -> None:
        super().__init__("cryptographic verification failed")


class InvalidMessage(FedgeError, ValueError):  # noqa: N818 - name fixed by STYLE.md
    """A protocol message is malformed, out of order, replayed or out of range."""


class PolicyViolation(FedgeError, ValueError):  # noqa: N818 - reads as what happened
    """The server asked for something outside the device's own policy; nothing was revealed."""


class ProtocolAbort(FedgeError, RuntimeError):  # noqa: N818 - name fixed by STYLE.md
    """A stage cannot continue; the round ends without a result.

    Parameters
    ----------
    stage
        The stage that could not complete.
    node_ids
        The nodes whose absence or misbehaviour caused it (may be empty).
    reason
        What is missing.
    """

    def __init__(self, stage: str, node_ids: Iterable[int], reason: str) -> None:
        self.stage = stage
        self.node_ids = tuple(sorted(node_ids))
        self.reason = reason
        shown = ", ".join(str(n) for n in self.node_ids[:10])
        more = f" and {len(self.node_ids) - 10} more" if len(self.node_ids) > 10 else ""
        nodes = f" (nodes {shown}{more})" if self.node_ids else ""
        super().__init__(f"secure aggregation aborted in {stage}: {reason}{nodes}")
