"""A hostile server against rounds keyed in advance: it cannot misuse the keys devices announce.

The devices are the real client mod reached through Flower messages and the real codec
(as in :mod:`tests.adversarial.hostile`); each device draws fresh randomness for every
key it makes. The hostile server substitutes, forges, replays and reuses pre-keys, and
lies about a holder's keys; each attack must be refused before the device seals a share
to a key it did not check, and a pre-key must never serve two rounds. An honest round with
colluding clients, played to the end, must leave no honest device's secrets in the
server's transcript.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from secure_agg import wire
from secure_agg.client import ClientSession
from secure_agg.crypto import AgreementKeyPair
from secure_agg.encoding import EncodingConfig, decode_sum, encode
from secure_agg.envelope import (
    PREKEY_FIELD,
    PREKEY_RECORD_KEY,
    VECTOR_KEY,
    VECTOR_RECORD_KEY,
    Stage,
)
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputReport,
    MaskedInputRequest,
    PreKey,
    PrekeyedShares,
    PreKeyRequest,
    UnmaskResponse,
)
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.prekeys import PendingPreKey
from secure_agg.randomness import DeterministicRandom, RandomSource
from secure_agg.server import ServerSession
from tests.adversarial.hostile import (
    MODEL_SIZE,
    Fleet,
    Transcript,
    decode,
    enrol,
    error_of,
    lax_policy,
    model_content,
)

HONEST = list(range(101, 111))
CORRUPT = [201, 202]
ENCODING = EncodingConfig(clip_range=0.5, ring_bits=32, max_clients=12, weight_cap=10)
LENGTH = MODEL_SIZE + 1
DAY = 24 * 3600


class _Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def _fresh(seed: int) -> Callable[[], RandomSource]:
    counter = itertools.count()
    return lambda: DeterministicRandom(seed * 1_000_003 + next(counter))


@dataclass
class Scene:
    """Ten honest devices (real mods), two colluding clients, and the hostile server's notes."""

    authority: EnrolmentAuthority
    fleet: Fleet
    clock: _Clock
    corrupt_ids: dict[int, NodeIdentity]
    revoked: set[str] = field(default_factory=set)
    corrupt_keys: dict[int, PendingPreKey] = field(default_factory=dict)
    prekeys: dict[int, PreKey] = field(default_factory=dict)

    def announce_all(self) -> None:
        """Ask every device for a pre-key (the colluders make theirs honestly)."""
        for node in HONEST:
            reply = self.fleet.send(node, Stage.PREKEY, b"p" * 16, PreKeyRequest(node))
            self.prekeys[node] = decode(reply, PreKey)
        for node in CORRUPT:
            pending = PendingPreKey.generate(node, DeterministicRandom(node), now=0)
            self.corrupt_keys[node] = pending
            self.prekeys[node] = pending.announce(self.corrupt_ids[node])

    def server(self, seed: int = 7) -> ServerSession:
        return ServerSession(
            HONEST + CORRUPT,
            degree=6,
            threshold=5,
            encoding=ENCODING,
            vector_length=LENGTH,
            threat_model=ThreatModel.ACTIVE,
            rng=DeterministicRandom(seed),
            authority_public_key=self.authority.public_key,
        )

    def send_setups(
        self,
        server: ServerSession,
        prekeys: dict[int, PreKey] | None = None,
        to: list[int] = HONEST,
    ) -> tuple[dict[int, PrekeyedShares], dict[int, str]]:
        """Send honest devices (all by default) the server's setup; return replies, refusals."""
        setups = server.prekeyed_setups(prekeys or self.prekeys)
        replies, refusals = {}, {}
        for node in to:
            reply = self.fleet.send(node, Stage.PREKEYED, server.round_id, setups[node])
            if reply.has_error():
                refusals[node] = error_of(reply)
            else:
                replies[node] = decode(reply, PrekeyedShares)
        return replies, refusals


def _scene() -> Scene:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    policy = DevicePolicy(protocol=_protocol(authority.public_key), min_noise_multiplier=0.01)
    clock = _Clock()
    fleet = Fleet(HONEST, policy, enrol(HONEST, authority))
    scene = Scene(authority, fleet, clock, enrol(CORRUPT, authority))
    for node in HONEST:
        fleet.mods[node] = make_secagg_mod(
            policy=policy,
            identities=fleet._identity_of,
            rng_factory=_fresh(node),
            clock=clock,
            # The device's own verified list (here: a set the test fills).
            revocations=lambda context: frozenset(scene.revoked),
        )
    return scene


def _protocol(authority: bytes) -> ProtocolPolicy:
    return ProtocolPolicy(
        threat_model=ThreatModel.ACTIVE,
        authority_public_key=authority,
        corrupt_fraction=0.1,
        min_survivors=6,
    )


def _sealed_nothing(scene: Scene, refusals: dict[int, str]) -> None:
    assert set(refusals) == set(HONEST)
    assert not any(scene.fleet.holds_state(n) for n in HONEST)


def test_keys_the_server_substituted_unsigned_get_no_share() -> None:
    scene = _scene()
    scene.announce_all()
    rng = DeterministicRandom(66)
    forged = {
        n: PreKey(
            node_id=n,
            enc_public=AgreementKeyPair.generate(rng).public,
            mask_public=AgreementKeyPair.generate(rng).public,
        )
        for n in HONEST + CORRUPT
    }
    # Each victim's own entry stays its real key: only its neighbours' are the server's.
    for victim in HONEST:
        shown = {**forged, victim: scene.prekeys[victim]}
        _, refusals = scene.send_setups(scene.server(seed=victim), shown, [victim])
        assert "cryptographic verification failed" in refusals[victim]
        assert not scene.fleet.holds_state(victim)


def test_keys_signed_under_a_forged_authority_get_no_share() -> None:
    scene = _scene()
    scene.announce_all()
    fake = EnrolmentAuthority.generate(DeterministicRandom(666))
    impostors = enrol(HONEST + CORRUPT, fake)
    rng = DeterministicRandom(67)
    forged = {}
    for node in HONEST + CORRUPT:
        pending = PendingPreKey.generate(node, rng, now=0)
        forged[node] = pending.announce(impostors[node])
    victim = HONEST[0]

    shown = {**forged, victim: scene.prekeys[victim]}

    _, refusals = scene.send_setups(scene.server(), shown, [victim])

    assert "cryptographic verification failed" in refusals[victim]
    assert not scene.fleet.holds_state(victim)


def test_the_colluders_identities_cannot_stand_in_for_many_holders() -> None:
    scene = _scene()
    scene.announce_all()
    # The server makes keys for every honest node and signs them with the two corrupt
    # identities (valid certificates): each victim's six holders would then be two devices.
    rng = DeterministicRandom(68)
    shown: dict[int, PreKey] = dict(scene.prekeys)
    for index, node in enumerate(HONEST):
        signer = scene.corrupt_ids[CORRUPT[index % 2]]
        pending = PendingPreKey.generate(node, rng, now=0)
        shown[node] = pending.announce(signer)
    victim = HONEST[3]
    shown[victim] = scene.prekeys[victim]

    _, refusals = scene.send_setups(scene.server(), shown)

    assert "appears twice among the holders" in refusals[victim]
    assert not scene.fleet.holds_state(victim)


def test_a_pre_key_serves_one_round_and_a_replay_is_refused() -> None:
    scene = _scene()
    scene.announce_all()
    first = scene.server(seed=1)
    replies, refusals = scene.send_setups(first)
    assert not refusals and set(replies) == set(HONEST)

    # The same keys in a second round (the first one abandoned, or run in parallel).
    _, replayed = scene.send_setups(scene.server(seed=2))

    _sealed_nothing(scene, replayed)
    assert all("holds no pre-key" in reason for reason in replayed.values())


def test_a_replaced_key_cannot_be_used_by_the_server() -> None:
    scene = _scene()
    scene.announce_all()
    old = dict(scene.prekeys)
    victim = HONEST[4]
    reply = scene.fleet.send(victim, Stage.PREKEY, b"q" * 16, PreKeyRequest(victim))
    new = decode(reply, PreKey)
    assert new.enc_public != old[victim].enc_public

    _, refusals = scene.send_setups(scene.server(), old)

    assert "does not hold" in refusals[victim]
    assert not scene.fleet.holds_state(victim)


def test_a_setup_outside_the_policy_is_refused_and_still_uses_up_the_key() -> None:
    scene = _scene()
    scene.announce_all()
    weak = ServerSession(
        HONEST + CORRUPT,
        degree=6,
        threshold=2,
        encoding=ENCODING,
        vector_length=LENGTH,
        threat_model=ThreatModel.ACTIVE,
        rng=DeterministicRandom(3),
        authority_public_key=scene.authority.public_key,
    )

    _, refusals = scene.send_setups(weak)
    _, again = scene.send_setups(scene.server())

    _sealed_nothing(scene, refusals)
    assert all("threshold 2" in reason for reason in refusals.values())
    # The refused round named the keys: they are gone, so no later round can use them.
    assert all("holds no pre-key" in reason for reason in again.values())


def test_a_device_revoked_after_it_announced_its_key_gets_no_share() -> None:
    scene = _scene()
    scene.announce_all()
    outcast = HONEST[6]
    scene.revoked.add(f"device-{outcast}")

    replies, refusals = scene.send_setups(scene.server())

    # Whoever drew the outcast as a holder refused before sealing anything to its key.
    assert any(n in refusals for n in HONEST if n != outcast)
    for node in HONEST:
        if node in refusals:
            assert "cryptographic verification failed" in refusals[node]
            assert not scene.fleet.holds_state(node)
        else:
            assert outcast not in replies[node].advert.holders


def test_a_pending_key_older_than_the_policy_allows_is_discarded() -> None:
    scene = _scene()
    scene.announce_all()
    scene.clock.now += 8 * DAY

    _, refusals = scene.send_setups(scene.server())

    _sealed_nothing(scene, refusals)
    assert all("older than the policy" in reason for reason in refusals.values())


def _play_round(
    scene: Scene, server: ServerSession, transcript: Transcript
) -> tuple[dict[int, KeyAdvertisement], dict[int, PreKey], np.ndarray]:
    """Play a whole round as an honest-but-colluding server; return adverts, new keys, sum."""
    setups = server.prekeyed_setups(scene.prekeys)
    corrupt: dict[int, ClientSession] = {}
    replies: dict[int, PrekeyedShares] = {}
    for node in CORRUPT:
        session = ClientSession(
            setups[node].setup,
            policy=lax_policy(ThreatModel.ACTIVE, scene.authority.public_key),
            rng=DeterministicRandom(node + 1),
            identity=scene.corrupt_ids[node],
            prekey=scene.corrupt_keys[node],
        )
        replies[node] = session.share_prekeyed(setups[node].prekeys)
        corrupt[node] = session
    for node in HONEST:
        reply = scene.fleet.send(node, Stage.PREKEYED, server.round_id, setups[node])
        replies[node] = decode(reply, PrekeyedShares)
    adverts = {n: r.advert for n, r in replies.items()}
    masked_requests = server.receive_prekeyed(replies)
    masked: dict[int, MaskedInput] = {}
    for node, request in masked_requests.items():
        if node in corrupt:
            zero = encode(
                np.zeros(MODEL_SIZE), weight=1, config=ENCODING, rng=DeterministicRandom(9)
            )
            masked[node] = corrupt[node].masked_input(request, zero)
            continue
        reply = scene.fleet.send(
            node, Stage.MASKED_INPUT, server.round_id, request, base=model_content()
        )
        report = decode(reply, MaskedInputReport)
        vector = reply.content.array_records[VECTOR_RECORD_KEY][VECTOR_KEY].numpy()
        masked[node] = MaskedInput(node_id=node, vector=vector, rejected=report.rejected)
    for node, session in corrupt.items():
        transcript.add_corrupt_holdings(node, session)
    consistency = server.receive_masked(masked)
    signatures: dict[int, ConsistencySignature] = {}
    for node, check in consistency.items():
        assert isinstance(check, ConsistencyRequest)
        if node in corrupt:
            signatures[node] = corrupt[node].confirm(check)
        else:
            reply = scene.fleet.send(node, Stage.CONSISTENCY, server.round_id, check)
            signatures[node] = decode(reply, ConsistencySignature)
    unmask_requests = server.receive_signatures(signatures)
    responses: dict[int, UnmaskResponse] = {}
    announced: dict[int, PreKey] = {}
    for node, unmask in unmask_requests.items():
        if node in corrupt:
            responses[node] = corrupt[node].unmask(unmask)
            continue
        reply = scene.fleet.send(node, Stage.UNMASK, server.round_id, unmask)
        responses[node] = decode(reply, UnmaskResponse)
        raw = reply.content.config_records[PREKEY_RECORD_KEY][PREKEY_FIELD]
        assert isinstance(raw, bytes)
        announced[node] = wire.decode(raw, PreKey)
        transcript.add_response(responses[node])
    result = server.finish(responses)
    return adverts, announced, result.total


def test_an_honest_round_keyed_in_advance_sums_exactly_and_exposes_nobody() -> None:
    scene = _scene()
    scene.announce_all()
    transcript = Transcript()
    server = scene.server()

    adverts, announced, total = _play_round(scene, server, transcript)

    mean, weight = decode_sum(total, config=ENCODING)
    expected = np.mean([0.01 * (i + 1) for i in range(len(HONEST))] + [0.0, 0.0])
    np.testing.assert_allclose(mean[:MODEL_SIZE], expected, atol=ENCODING.error_bound)
    assert weight == len(HONEST) + len(CORRUPT)
    assert transcript.exposed(HONEST, adverts, server.round_id) == []
    # Each device announced its next keys, signed, and they differ from the ones used.
    for node, prekey in announced.items():
        assert prekey.enc_public != scene.prekeys[node].enc_public
        assert prekey.certificate is not None and prekey.signature is not None


def test_a_holder_advertising_other_keys_than_its_pre_key_is_refused() -> None:
    scene = _scene()
    scene.announce_all()
    server = scene.server()
    setups = server.prekeyed_setups(scene.prekeys)
    replies = {
        n: decode(scene.fleet.send(n, Stage.PREKEYED, server.round_id, setups[n]), PrekeyedShares)
        for n in HONEST
    }
    # A colluder advertises keys other than its announced pre-key (properly signed by
    # itself); the server relays that advertisement to the devices that drew it.
    liar = CORRUPT[0]
    session = ClientSession(
        setups[liar].setup,
        policy=lax_policy(ThreatModel.ACTIVE, scene.authority.public_key),
        rng=DeterministicRandom(5),
        identity=scene.corrupt_ids[liar],
    )
    lying = session.advertise()
    victims = [n for n in HONEST if liar in replies[n].advert.holders]
    assert victims
    for victim in victims:
        request = MaskedInputRequest(
            partners=(liar,),
            ciphertexts={},
            adverts=(lying,),
        )
        reply = scene.fleet.send(
            victim, Stage.MASKED_INPUT, server.round_id, request, base=model_content()
        )
        assert "other keys than the pre-key" in error_of(reply)
        assert not scene.fleet.holds_state(victim)


def test_a_pre_key_moved_to_another_node_is_refused_by_whoever_draws_that_node() -> None:
    scene = _scene()
    scene.announce_all()
    source, target = HONEST[0], HONEST[1]
    # The signature covers the node id: the same signed key filed under another node.
    moved = replace(scene.prekeys[source], node_id=target)

    replies, refusals = scene.send_setups(scene.server(), {**scene.prekeys, target: moved})

    assert "does not hold" in refusals[target]
    others = [n for n in HONEST if n != target]
    assert any(n in refusals for n in others), "somebody drew the target as a holder"
    for node in others:
        if node in refusals:
            assert not scene.fleet.holds_state(node)
        else:
            assert target not in replies[node].advert.holders
