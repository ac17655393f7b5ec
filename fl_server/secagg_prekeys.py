"""The server's store of the pre-keys devices announced, each handed out for one round at most.

Devices announce the keys of their next participation with their last reply of
a round (:mod:`secure_agg.prekeys`). The store checks each on arrival (node,
sizes and, in the active model, the enrolment certificate and signature) and
keeps only the newest per node; :meth:`PreKeyStore.take` removes the keys of a
round's participants as the round starts, so none is used twice even when the
round then fails. A device that lost its key, or whose key the store no longer
holds, is asked for a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterable

from secure_agg.messages import PreKey
from secure_agg.params import ThreatModel
from secure_agg.prekeys import prekey_problem

__all__ = ["PreKeyStore"]


class PreKeyStore:
    """The announced pre-keys of a run's devices, by node id (in memory: they are public).

    Parameters
    ----------
    threat_model
        The run's threat model (the active model requires signed pre-keys).
    authority_public_key
        The enrolment authority's key, against which certificates are checked.
    """

    def __init__(self, threat_model: ThreatModel, authority_public_key: bytes | None) -> None:
        self._threat = threat_model
        self._authority = authority_public_key
        self._keys: dict[int, PreKey] = {}

    def offer(self, node: int, prekey: PreKey) -> str | None:
        """Keep ``prekey`` as ``node``'s next key if it is valid; return why not otherwise.

        A valid key replaces the node's previous one (the device deleted it); an
        invalid one is dropped and leaves the previous key in place.
        """
        problem = prekey_problem(
            prekey, node_id=node, threat_model=self._threat, authority=self._authority
        )
        if problem is None:
            self._keys[node] = prekey
        return problem

    def missing(self, nodes: Iterable[int]) -> list[int]:
        """Return the nodes of ``nodes`` that hold no announced key here, sorted."""
        return sorted(n for n in nodes if n not in self._keys)

    def take(self, nodes: Iterable[int]) -> dict[int, PreKey]:
        """Remove and return the keys of ``nodes`` (each is used for one round only).

        Raises
        ------
        KeyError
            If a node has no key (check :meth:`missing` first).
        """
        wanted = list(nodes)
        taken = {n: self._keys[n] for n in wanted}
        for node in wanted:
            del self._keys[node]
        return taken
