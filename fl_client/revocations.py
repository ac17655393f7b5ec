"""The device's revocation list: the latest list it verified, kept in its own directory.

A device refuses, in active-model secure rounds, every neighbour whose enrolment
id is on this list (:meth:`secure_agg.policy.ProtocolPolicy.check_certificate`).
The list comes from the cloud, but the device takes nothing on trust: a list is
stored only after it verifies with the enrolment authority key pinned in the
device's policy, and only if its sequence number is higher than the stored one,
so a server cannot roll the device back to an older list and un-revoke a device.

Notes
-----
The file (``revocation-list.json``, the authority's signed envelope as received)
is replaced atomically (temporary file, fsync, rename, directory fsync): a crash
leaves the old list or the new one, never a torn one. Its signature is verified
again whenever it is read, so a damaged or edited file is refused (and the
device's secure rounds with it) rather than silently forgotten; the next valid
list the device receives replaces it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Set
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from flwr.app import Context

from edge_runtime.durable import write_atomically
from fedge.errors import ConfigError, StorageError
from secure_agg.crypto import KEY_BYTES
from secure_agg.errors import CryptoError
from secure_agg.policy import ProtocolPolicy
from secure_agg.revocation import MAX_LIST_BYTES, RevocationList, verify_revocation_list

__all__ = [
    "REVOCATION_FILE",
    "RevocationProvider",
    "RevocationStore",
    "nothing_revoked",
]

logger = logging.getLogger(__name__)

REVOCATION_FILE: Final = "revocation-list.json"
# The stored list's issue time was checked against the device's clock when it was
# accepted; reading it back rechecks the signature and format only (a clock set
# back later must not turn the stored list into an unreadable one).
_ANY_TIME: Final = datetime(9000, 1, 1, tzinfo=UTC)


class RevocationProvider(Protocol):
    """Return the enrolment ids the device running ``context`` treats as revoked."""

    def __call__(self, context: Context) -> Set[str]:
        """Return the revoked enrolment ids for the device running ``context``."""
        ...


def nothing_revoked(context: Context) -> frozenset[str]:
    """Revoke nobody (a device that has received no revocation list yet)."""
    del context
    return frozenset()


class RevocationStore:
    """The latest revocation list a device verified, in ``<directory>/revocation-list.json``.

    Parameters
    ----------
    directory
        The device's own directory (it must exist).
    policy
        The device's secure-aggregation policy: its pinned authority key verifies every list.
    clock
        The device's clock in Unix seconds (``time.time``; tests inject one).

    Raises
    ------
    ConfigError
        If the policy pins no enrolment authority.

    Notes
    -----
    One store serves the one device whose directory it reads; as a
    :class:`RevocationProvider` it can be given to
    :func:`fl_client.secagg_mod.make_secagg_mod` directly.
    """

    def __init__(
        self,
        directory: Path,
        *,
        policy: ProtocolPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = policy.authority_public_key
        if key is None or len(key) != KEY_BYTES:
            raise ConfigError("a revocation list needs the policy's enrolment authority key")
        self._authority = key
        self._clock = clock
        self.path = Path(directory) / REVOCATION_FILE

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_LIST_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read the revocation list {self.path}: {exc}") from exc
        return data

    def current(self) -> RevocationList | None:
        """Return the stored list, verified again (``None`` if none was ever stored).

        Raises
        ------
        CryptoError
            If the stored file does not verify (damaged or edited).
        StorageError
            If the file cannot be read.
        """
        data = self._read()
        if data is None:
            return None
        return verify_revocation_list(data, self._authority, now=_ANY_TIME)

    def revoked_ids(self) -> frozenset[str]:
        """Return the enrolment ids on the stored list (none if no list was stored).

        Raises
        ------
        CryptoError
            If the stored file does not verify.
        StorageError
            If the file cannot be read.
        """
        stored = self.current()
        return frozenset() if stored is None else stored.device_ids

    def __call__(self, context: Context) -> frozenset[str]:
        """Return :meth:`revoked_ids` (the store's one device runs ``context``)."""
        del context
        return self.revoked_ids()

    def accept(self, data: bytes) -> RevocationList:
        """Verify a revocation list and store it if it is newer than the stored one.

        Parameters
        ----------
        data
            The signed envelope, as the cloud sent it.

        Returns
        -------
        RevocationList
            The list the device now holds: ``data``'s if its sequence is higher
            than the stored one's (or none was stored), else the stored one
            (a list with the same sequence changes nothing).

        Raises
        ------
        CryptoError
            Opaquely, if ``data`` does not verify with the pinned authority key,
            is issued in the device's future, or has a lower sequence than the
            stored list (a replay); nothing is written.
        StorageError
            If the stored list cannot be read or the new one cannot be written.

        Notes
        -----
        A stored file that no longer verifies (damaged on the device's own
        disk, which the server cannot write) is replaced by any valid list.
        """
        try:
            stored = self.current()
        except CryptoError:
            logger.warning("the stored revocation list %s does not verify", self.path)
            stored = None
        floor = 0 if stored is None else stored.sequence
        received = verify_revocation_list(
            data, self._authority, now=self._now(), min_sequence=floor
        )
        if stored is not None and received.sequence == stored.sequence:
            # The registry issues one revoked set per sequence: keep what is stored.
            return stored
        try:
            write_atomically(self.path, data, mode=0o600)
        except OSError as exc:
            raise StorageError(f"cannot store the revocation list {self.path}: {exc}") from exc
        logger.info(
            "revocation list %d stored (%d revoked devices)",
            received.sequence,
            len(received.revoked),
        )
        return received
