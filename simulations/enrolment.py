"""Enrol the simulated devices: one enrolment authority, one certified identity per client.

In a fleet the authority is a separate service that certifies each device once
(issue: enrolment registry); a simulation stands one up in memory for the run,
certifies every partition, and drops the authority's signing key, so not even
the simulated coordinator can mint an identity afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context

from fedge.errors import ConfigError
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import RandomSource, SystemRandomSource

__all__ = ["SimulatedFleet", "enrol_fleet"]


@dataclass(frozen=True, slots=True)
class SimulatedFleet:
    """The identities of the simulated devices, found by their ``partition-id``.

    Picklable: the simulation engine ships it to its workers with the ClientApp.
    """

    authority_public_key: bytes
    identities: dict[int, NodeIdentity]

    def __call__(self, context: Context) -> NodeIdentity | None:
        """Return the identity of the device running ``context``."""
        try:
            partition = int(context.node_config["partition-id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("node config must set an integer 'partition-id'") from exc
        return self.identities.get(partition)


def enrol_fleet(num_clients: int, *, rng: RandomSource | None = None) -> SimulatedFleet:
    """Create an authority, certify ``num_clients`` devices, and forget the authority's key."""
    source = rng or SystemRandomSource()
    authority = EnrolmentAuthority.generate(source)
    identities = {p: authority.enrol(f"sim-device-{p}", source) for p in range(num_clients)}
    return SimulatedFleet(authority_public_key=authority.public_key, identities=identities)
