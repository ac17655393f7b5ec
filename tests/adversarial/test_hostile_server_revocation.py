"""A hostile server relays revoked or expired devices to honest ones, or replays an old list.

The honest devices are the real client mod, each with its own stored revocation list
(:class:`fl_client.revocations.RevocationStore`) and its own clock. The server colludes
with a device the enrolment authority really certified, but which has since been
revoked (or whose certificate has expired), and relays its advertisement to its honest
neighbours. A device shown it must refuse the round exactly as it refuses a forged
certificate: opaquely, at share-keys, with no share sealed for anyone. The server also
cannot undo a revocation by delivering an older list: the device keeps the newer one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fl_client.policy import DevicePolicy
from fl_client.revocations import RevocationStore
from fl_client.secagg_mod import make_secagg_mod
from secure_agg.client import ClientSession
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import Stage
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.messages import (
    EncryptedShares,
    KeyAdvertisement,
    RoundSetup,
    ShareKeysRequest,
)
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom, RandomSource
from secure_agg.revocation import RevokedDevice, build_revocation_list
from secure_agg.server import ServerSession
from tests.adversarial.hostile import MODEL_SIZE, Fleet, decode, error_of, lax_policy

HONEST = list(range(101, 111))  # ten honest devices
OUTCAST = 201  # enrolled by the real authority, then revoked or expired; sides with the server
OUTCAST_ID = "device-201"
ENCODING = EncodingConfig(clip_range=0.5, ring_bits=32, max_clients=11, weight_cap=10)
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW_S = int(NOW.timestamp())
YEAR_S = 365 * 24 * 3600


@dataclass
class DeviceClock:
    """The devices' own clock (Unix seconds); the server has no way to set it."""

    seconds: float = float(NOW_S)

    def __call__(self) -> float:
        return self.seconds


def _seeded(seed: int) -> Callable[[], RandomSource]:
    return lambda: DeterministicRandom(seed)


@dataclass
class RevokingFleet(Fleet):
    """The honest fleet, each device with its own stored revocation list and clock."""

    directory: Path = Path()
    clock: DeviceClock = field(default_factory=DeviceClock)
    stores: dict[int, RevocationStore] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        protocol = self.policy.secure_protocol()
        for node in self.nodes:
            own = self.directory / f"device-{node}"
            own.mkdir(parents=True)
            self.stores[node] = RevocationStore(own, policy=protocol, clock=self.clock)
            self.mods[node] = make_secagg_mod(
                policy=self.policy,
                identities=self._identity_of,
                rng_factory=_seeded(10_000 + node),
                revocations=self.stores[node],
                clock=self.clock,
            )


@dataclass
class Scene:
    """The authority, the honest fleet, and the colluding outcast's session."""

    authority: EnrolmentAuthority
    fleet: RevokingFleet
    outcast: NodeIdentity


def _scene(tmp_path: Path, *, outcast_expires_at: int | None) -> Scene:
    authority = EnrolmentAuthority.generate(DeterministicRandom(41))
    policy = DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=ThreatModel.ACTIVE,
            authority_public_key=authority.public_key,
            corrupt_fraction=0.1,
            min_survivors=6,
        )
    )
    rng = DeterministicRandom(42)
    identities = {n: authority.enrol(f"device-{n}", rng, expires_at=NOW_S + YEAR_S) for n in HONEST}
    outcast = authority.enrol(OUTCAST_ID, rng, expires_at=outcast_expires_at)
    fleet = RevokingFleet(HONEST, policy, identities, directory=tmp_path)
    return Scene(authority=authority, fleet=fleet, outcast=outcast)


def _revocation_list(scene: Scene, *ids: str, sequence: int) -> bytes:
    revoked = [RevokedDevice(device_id=i, revoked_at=NOW - timedelta(hours=1)) for i in ids]
    return build_revocation_list(scene.authority, revoked, sequence=sequence, now=NOW)


@dataclass
class Round:
    """What the hostile server sent and got back at share-keys."""

    requests: dict[int, ShareKeysRequest]
    shares: dict[int, EncryptedShares] = field(default_factory=dict)
    refusals: dict[int, str] = field(default_factory=dict)

    def shown_outcast(self) -> list[int]:
        return [n for n, r in self.requests.items() if any(a.node_id == OUTCAST for a in r.adverts)]


def _play(scene: Scene) -> Round:
    """Set up a round with the outcast, relay every advertisement along its edges, share keys."""
    authority = scene.authority
    least = scene.fleet.policy.secure_protocol().least_threshold(len(HONEST) + 1, 6)
    server = ServerSession(
        [*HONEST, OUTCAST],
        degree=6,
        threshold=least,
        encoding=ENCODING,
        vector_length=MODEL_SIZE + 1,
        threat_model=ThreatModel.ACTIVE,
        rng=DeterministicRandom(7),
        authority_public_key=authority.public_key,
    )
    setups = server.setups()
    colluder = ClientSession(
        setups[OUTCAST],
        policy=lax_policy(ThreatModel.ACTIVE, authority.public_key),
        rng=DeterministicRandom(OUTCAST),
        identity=scene.outcast,
    )
    adverts: dict[int, KeyAdvertisement] = {OUTCAST: colluder.advertise()}
    for node in HONEST:
        setup: RoundSetup = setups[node]
        reply = scene.fleet.send(node, Stage.SETUP, server.round_id, setup)
        adverts[node] = decode(reply, KeyAdvertisement)
    # The hostile server relays everything along the edges, the outcast's advert included.
    played = Round(
        requests={
            n: ShareKeysRequest(
                tuple(
                    a
                    for m, a in adverts.items()
                    if m != n and (m in adverts[n].holders or n in a.holders)
                )
            )
            for n in HONEST
        }
    )
    for node, request in played.requests.items():
        reply = scene.fleet.send(node, Stage.SHARE_KEYS, server.round_id, request)
        if reply.has_error():
            played.refusals[node] = error_of(reply)
        else:
            played.shares[node] = decode(reply, EncryptedShares)
    return played


def _assert_refused(scene: Scene, played: Round) -> None:
    shown = played.shown_outcast()
    assert shown, "the outcast reached nobody: the test proves nothing"
    for node in shown:
        # Refused exactly like a forged certificate: opaquely, nothing sent, secrets wiped.
        assert played.refusals[node].endswith("cryptographic verification failed")
        assert node not in played.shares
        assert not scene.fleet.holds_state(node)
    # The devices never shown the outcast shared with genuine neighbours only.
    assert set(played.shares) == set(HONEST) - set(shown)
    for message in played.shares.values():
        assert OUTCAST not in message.ciphertexts


def test_a_revoked_device_relayed_by_the_server_gets_no_share(tmp_path: Path) -> None:
    scene = _scene(tmp_path, outcast_expires_at=NOW_S + YEAR_S)
    data = _revocation_list(scene, OUTCAST_ID, sequence=1)
    for store in scene.fleet.stores.values():
        store.accept(data)

    played = _play(scene)

    _assert_refused(scene, played)


def test_an_expired_device_relayed_by_the_server_gets_no_share(tmp_path: Path) -> None:
    scene = _scene(tmp_path, outcast_expires_at=NOW_S - 60)

    played = _play(scene)

    _assert_refused(scene, played)


@pytest.mark.parametrize("outcast_expires_at", [NOW_S + 60, None])
def test_the_same_device_unrevoked_and_unexpired_is_accepted(
    tmp_path: Path, outcast_expires_at: int | None
) -> None:
    # The control: without the revocation or the expiry the same relay goes through,
    # so the refusals above come from those checks and nothing else.
    scene = _scene(tmp_path, outcast_expires_at=outcast_expires_at)
    unrelated = _revocation_list(scene, "device-999", sequence=1)
    for store in scene.fleet.stores.values():
        store.accept(unrelated)

    played = _play(scene)

    assert played.shown_outcast()
    assert not played.refusals
    assert any(OUTCAST in message.ciphertexts for message in played.shares.values())


def test_a_device_whose_clock_passed_the_expiry_mid_life_refuses(tmp_path: Path) -> None:
    scene = _scene(tmp_path, outcast_expires_at=NOW_S + 60)
    scene.fleet.clock.seconds = NOW_S + 60  # the device's own clock, not the server's word

    played = _play(scene)

    _assert_refused(scene, played)


def test_a_replayed_older_revocation_list_cannot_unrevoke_a_device(tmp_path: Path) -> None:
    scene = _scene(tmp_path, outcast_expires_at=NOW_S + YEAR_S)
    older = _revocation_list(scene, sequence=1)  # before the outcast was revoked
    newer = _revocation_list(scene, OUTCAST_ID, sequence=2)
    for store in scene.fleet.stores.values():
        store.accept(older)
        store.accept(newer)

    # The server delivers the older list again (genuinely signed, lower sequence).
    for store in scene.fleet.stores.values():
        with pytest.raises(CryptoError):
            store.accept(older)
        assert OUTCAST_ID in store.revoked_ids()
    played = _play(scene)

    _assert_refused(scene, played)
