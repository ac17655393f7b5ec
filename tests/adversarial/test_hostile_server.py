"""A hostile server against devices that enforce their own policy: every attack is refused.

Each attack of the trust-boundary issue, played by a server written here, against the
real client mod reached through Flower messages and the real codec. After each, the
server's whole transcript (every share it was sent, plus everything its colluding
clients hold) is searched for any honest client whose self-mask seed and masking key
it can both reconstruct: there must be none.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from fl_client.policy import DevicePolicy
from secure_agg.client import ClientSession
from secure_agg.encoding import EncodingConfig, decode_sum, encode
from secure_agg.envelope import VECTOR_KEY, VECTOR_RECORD_KEY, Stage
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputReport,
    MaskedInputRequest,
    RoundSetup,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    setup_digest,
    survivors_message,
)
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
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

HONEST = list(range(101, 111))  # ten honest devices
CORRUPT = [201, 202]  # two clients colluding with the server: 2 of 12 (ceil of 10 %)
ENCODING = EncodingConfig(clip_range=0.5, ring_bits=32, max_clients=12, weight_cap=10)
LENGTH = MODEL_SIZE + 1


@dataclass
class Attack:
    """A round as the hostile server plays it, with the devices' replies and its transcript."""

    authority: EnrolmentAuthority
    fleet: Fleet
    corrupt: dict[int, ClientSession] = field(default_factory=dict)
    adverts: dict[int, KeyAdvertisement] = field(default_factory=dict)
    transcript: Transcript = field(default_factory=Transcript)
    refusals: dict[int, str] = field(default_factory=dict)
    corrupt_ids: dict[int, NodeIdentity] = field(default_factory=dict)

    @property
    def policy(self) -> ProtocolPolicy:
        protocol = self.fleet.policy.protocol
        assert protocol is not None
        return protocol

    def least_threshold(self, degree: int) -> int:
        return self.policy.least_threshold(len(HONEST) + len(CORRUPT), degree)

    def setup_all(self, server: ServerSession) -> dict[int, RoundSetup]:
        """Stage 1: every device gets the server's setup; collect the advertisements."""
        setups = server.setups()
        corrupt_ids = self.corrupt_ids = enrol(CORRUPT, self.authority)
        for node in CORRUPT:
            self.corrupt[node] = ClientSession(
                setups[node],
                policy=lax_policy(setups[node].threat_model, self.authority.public_key),
                rng=DeterministicRandom(node),
                identity=corrupt_ids[node],
            )
            self.adverts[node] = self.corrupt[node].advertise()
        for node in HONEST:
            reply = self.fleet.send(node, Stage.SETUP, server.round_id, setups[node])
            if reply.has_error():
                self.refusals[node] = error_of(reply)
            else:
                self.adverts[node] = decode(reply, KeyAdvertisement)
        return setups

    def share_keys(
        self, requests: dict[int, ShareKeysRequest], round_id: bytes
    ) -> dict[int, EncryptedShares]:
        out = {}
        for node, request in requests.items():
            if node in self.corrupt:
                out[node] = self.corrupt[node].share_keys(request)
                continue
            reply = self.fleet.send(node, Stage.SHARE_KEYS, round_id, request)
            if reply.has_error():
                self.refusals[node] = error_of(reply)
            else:
                out[node] = decode(reply, EncryptedShares)
        return out

    def masked(
        self, requests: dict[int, MaskedInputRequest], round_id: bytes
    ) -> dict[int, MaskedInput]:
        out = {}
        for node, request in requests.items():
            if node in self.corrupt:
                zero = encode(
                    np.zeros(MODEL_SIZE), weight=1, config=ENCODING, rng=DeterministicRandom(node)
                )
                out[node] = self.corrupt[node].masked_input(request, zero)
                continue
            reply = self.fleet.send(
                node, Stage.MASKED_INPUT, round_id, request, base=model_content()
            )
            if reply.has_error():
                self.refusals[node] = error_of(reply)
                continue
            report = decode(reply, MaskedInputReport)
            vector = reply.content.array_records[VECTOR_RECORD_KEY][VECTOR_KEY].numpy()
            out[node] = MaskedInput(node_id=node, vector=vector, rejected=report.rejected)
        for node, session in self.corrupt.items():
            self.transcript.add_corrupt_holdings(node, session)
        return out

    def unmask(self, node: int, request: UnmaskRequest, round_id: bytes) -> None:
        reply = self.fleet.send(node, Stage.UNMASK, round_id, request)
        if reply.has_error():
            self.refusals[node] = error_of(reply)
        else:
            self.transcript.add_response(decode(reply, UnmaskResponse))

    def exposed(self, round_id: bytes) -> list[int]:
        return self.transcript.exposed(HONEST, self.adverts, round_id)


def _attack(threat: ThreatModel = ThreatModel.ACTIVE, *, min_survivors: int = 6) -> Attack:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    policy = DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=threat,
            authority_public_key=authority.public_key,
            corrupt_fraction=0.1,
            min_survivors=min_survivors,
        )
    )
    identities: dict[int, NodeIdentity] = enrol(HONEST, authority)
    return Attack(authority=authority, fleet=Fleet(HONEST, policy, identities))


def _server(attack: Attack, **overrides: object) -> ServerSession:
    values: dict[str, object] = {
        "degree": 6,
        "threshold": attack.least_threshold(6),
        "encoding": ENCODING,
        "vector_length": LENGTH,
        "threat_model": ThreatModel.ACTIVE,
        "rng": DeterministicRandom(7),
        "authority_public_key": attack.authority.public_key,
    }
    values.update(overrides)
    return ServerSession(HONEST + CORRUPT, **values)  # type: ignore[arg-type]


def _relay_everything(attack: Attack) -> dict[int, ShareKeysRequest]:
    """Relay to each device every advertisement along its edges, unchecked."""
    return {
        n: ShareKeysRequest(
            tuple(
                a
                for m, a in attack.adverts.items()
                if m != n and (m in attack.adverts[n].holders or n in a.holders)
            )
        )
        for n in HONEST
    }


def test_a_downgrade_to_the_semi_honest_model_is_refused_before_any_key() -> None:
    attack = _attack()
    server = _server(attack, threat_model=ThreatModel.SEMI_HONEST, authority_public_key=None)

    attack.setup_all(server)

    assert set(attack.refusals) == set(HONEST)
    assert all("requires active" in reason for reason in attack.refusals.values())
    assert not any(attack.fleet.holds_state(n) for n in HONEST)
    assert set(attack.adverts) == set(CORRUPT)


def test_a_substituted_authority_and_invented_neighbours_get_no_share() -> None:
    attack = _attack()
    forger = EnrolmentAuthority.generate(DeterministicRandom(666))
    invented = enrol(CORRUPT, forger)  # the server's own "devices", certified by itself
    server = _server(attack, authority_public_key=forger.public_key)
    setups = attack.setup_all(server)
    for node in CORRUPT:  # the colluders advertise under the forged identities instead
        attack.corrupt[node] = ClientSession(
            setups[node],
            policy=lax_policy(ThreatModel.ACTIVE, forger.public_key),
            rng=DeterministicRandom(node + 1),
            identity=invented[node],
        )
        attack.adverts[node] = attack.corrupt[node].advertise()
    # The server relays to each device every advertisement that concerns it, its own
    # invented ones included (it cannot check the honest ones under its forged key).
    requests = _relay_everything(attack)

    shares = attack.share_keys(requests, server.round_id)

    refused = [n for n in HONEST if n in attack.refusals]
    # Every device that was shown an invented neighbour refused (opaquely) and sent nothing.
    for node in HONEST:
        shown_invented = any(a.node_id in CORRUPT for a in requests[node].adverts)
        if shown_invented:
            assert node in refused
            assert attack.refusals[node].endswith("cryptographic verification failed")
            assert node not in shares
    assert refused, "the attack reached nobody: the test proves nothing"
    # The devices that saw only genuine neighbours sealed their shares for those alone.
    for message in shares.values():
        assert not set(message.ciphertexts) & set(CORRUPT)


@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_a_threshold_below_the_devices_rule_is_refused(threshold: int) -> None:
    attack = _attack()
    least = attack.least_threshold(6)
    assert threshold < least  # the rule: floor((k + c_max) / 2) + 1 with c_max corrupt holders
    server = _server(attack, threshold=threshold)

    attack.setup_all(server)

    assert set(attack.refusals) == set(HONEST)
    assert all(f"threshold {threshold} with 6 holders" in r for r in attack.refusals.values())
    assert not any(attack.fleet.holds_state(n) for n in HONEST)


def test_too_few_holders_are_refused() -> None:
    attack = _attack()
    server = _server(attack, degree=1, threshold=1)

    attack.setup_all(server)

    assert all("holders outside" in r for r in attack.refusals.values())


def _through_masked_input(attack: Attack, server: ServerSession) -> dict[int, MaskedInput]:
    attack.setup_all(server)
    requests = server.receive_adverts(attack.adverts)
    shares = attack.share_keys(requests, server.round_id)
    routed = server.receive_shares(shares)
    return attack.masked(routed, server.round_id)


def _sign_all(
    attack: Attack, survivors: tuple[int, ...], round_id: bytes, nodes: list[int]
) -> dict[int, bytes]:
    """The devices in ``nodes`` are shown ``survivors``; the colluders sign anything."""
    signatures = {}
    for node in nodes:
        if node in attack.corrupt:
            message = survivors_message(round_id, tuple(sorted(survivors)))
            signatures[node] = attack.corrupt_ids[node].sign(message)
            continue
        reply = attack.fleet.send(node, Stage.CONSISTENCY, round_id, ConsistencyRequest(survivors))
        if reply.has_error():
            attack.refusals[node] = error_of(reply)
        else:
            signatures[node] = decode(reply, ConsistencySignature).signature
    return signatures


@pytest.mark.parametrize("victim", [101, 105, 110])
def test_split_survivor_views_reveal_no_device_secret(victim: int) -> None:
    attack = _attack()
    server = _server(attack)
    masked = _through_masked_input(attack, server)
    everyone = tuple(sorted(masked))
    without_victim = tuple(n for n in everyone if n != victim)
    # Half the devices are told the victim survived (they would reveal its self-mask
    # share), half that it dropped (they would reveal its masking-key share).
    others = [n for n in HONEST if n != victim]
    group_a, group_b = others[::2], others[1::2]
    signed_a = _sign_all(attack, everyone, server.round_id, [*group_a, victim, *CORRUPT])
    signed_b = _sign_all(attack, without_victim, server.round_id, [*group_b, *CORRUPT])

    for node in [*group_a, victim]:
        attack.unmask(node, UnmaskRequest(everyone, signed_a), server.round_id)
    for node in group_b:
        attack.unmask(node, UnmaskRequest(without_victim, signed_b), server.round_id)

    assert attack.exposed(server.round_id) == []
    # The honest holders asked about the victim answered at most one way each...
    kinds = {holder: kind for (holder, kind) in attack.transcript.shares.get(victim, {})}
    assert all(
        (h, "self") not in attack.transcript.shares.get(victim, {})
        or (h, "key") not in attack.transcript.shares[victim]
        for h in HONEST
    )
    # ...and the server did not get t of both kinds.
    threshold = attack.least_threshold(6)
    both = (
        attack.transcript.count(victim, "self") >= threshold
        and attack.transcript.count(victim, "key") >= threshold
    )
    assert not both, kinds


def test_a_survivor_set_below_the_policy_minimum_is_refused() -> None:
    attack = _attack(min_survivors=6)
    server = _server(attack)
    masked = _through_masked_input(attack, server)
    victim = HONEST[0]
    tiny = tuple(sorted({victim, *CORRUPT, HONEST[1]}))
    assert set(tiny) <= set(masked)

    signatures = _sign_all(attack, tiny, server.round_id, [victim, HONEST[1], *CORRUPT])
    # Refused when shown the set (nothing signed), and its secrets are gone.
    assert "4 survivors; the device unmasks only for at least 6" in attack.refusals[victim]
    assert victim not in signatures and not attack.fleet.holds_state(victim)
    attack.unmask(victim, UnmaskRequest(tiny, signatures), server.round_id)

    assert "without a round in progress" in attack.refusals[victim]
    assert attack.exposed(server.round_id) == []
    assert victim not in {
        h for owner in attack.transcript.shares for (h, _) in attack.transcript.shares[owner]
    }


def test_a_server_cannot_impose_neighbours_or_withhold_the_devices_own_holders() -> None:
    attack = _attack()
    server = _server(attack)
    attack.setup_all(server)
    requests = server.receive_adverts(attack.adverts)
    victim = HONEST[0]
    advert = attack.adverts[victim]
    strangers = [
        m
        for m, a in attack.adverts.items()
        if m != victim and m not in advert.holders and victim not in a.holders
    ]
    assert strangers
    imposed = ShareKeysRequest((*requests[victim].adverts, attack.adverts[strangers[0]]))
    reply = attack.fleet.send(victim, Stage.SHARE_KEYS, server.round_id, imposed)
    assert "not a neighbour" in error_of(reply)

    # Withhold every honest holder the victim drew: only colluders would hold its shares.
    attack2 = _attack()
    server2 = _server(attack2, rng=DeterministicRandom(8))
    attack2.setup_all(server2)
    requests2 = server2.receive_adverts(attack2.adverts)
    drawn = attack2.adverts[victim].holders
    only_corrupt = ShareKeysRequest(
        tuple(
            a for a in requests2[victim].adverts if a.node_id not in drawn or a.node_id in CORRUPT
        )
    )
    reply2 = attack2.fleet.send(victim, Stage.SHARE_KEYS, server2.round_id, only_corrupt)

    assert "of this client's holders advertised keys" in error_of(reply2)
    assert not attack2.fleet.holds_state(victim)


def test_showing_two_devices_different_setups_is_caught_by_their_neighbours() -> None:
    attack = _attack()
    server = _server(attack)
    setups = attack.setup_all(server)
    # The server shows one device a setup with another threshold (its advertisement then
    # carries another digest) and relays it as it is.
    cheated = HONEST[3]
    other = replace(setups[cheated], threshold=setups[cheated].threshold + 1)
    reply = attack.fleet.send(cheated, Stage.SETUP, server.round_id, other)
    attack.adverts[cheated] = decode(reply, KeyAdvertisement)
    assert attack.adverts[cheated].setup_digest == setup_digest(other)
    requests = _relay_everything(attack)

    attack.share_keys(requests, server.round_id)

    neighbours = [
        n for n in HONEST if n != cheated and any(a.node_id == cheated for a in requests[n].adverts)
    ]
    assert neighbours
    for node in [*neighbours, cheated]:
        assert "was shown another round setup" in attack.refusals[node]


def test_an_honest_round_under_the_same_policies_still_sums_exactly() -> None:
    attack = _attack()
    server = _server(attack)
    masked = _through_masked_input(attack, server)
    confirm = server.receive_masked(masked)
    signatures: dict[int, ConsistencySignature] = {}
    for node, request in confirm.items():
        if node in attack.corrupt:
            signatures[node] = attack.corrupt[node].confirm(request)  # type: ignore[arg-type]
        else:
            reply = attack.fleet.send(node, Stage.CONSISTENCY, server.round_id, request)
            signatures[node] = decode(reply, ConsistencySignature)
    unmask = server.receive_signatures(signatures)
    responses = {}
    for node, request in unmask.items():
        if node in attack.corrupt:
            responses[node] = attack.corrupt[node].unmask(request)
        else:
            reply = attack.fleet.send(node, Stage.UNMASK, server.round_id, request)
            responses[node] = decode(reply, UnmaskResponse)

    result = server.finish(responses)

    assert attack.refusals == {}
    assert result.survivors == tuple(sorted(HONEST + CORRUPT))
    mean, weight = decode_sum(result.total, config=ENCODING)
    # Device i trained update 0.01 (i + 1) with weight 1; the colluders sent zeros.
    expected = sum(0.01 * (i + 1) for i in range(len(HONEST))) / (len(HONEST) + len(CORRUPT))
    assert weight == len(HONEST) + len(CORRUPT)
    np.testing.assert_allclose(mean, expected, atol=ENCODING.error_bound)


def test_the_same_split_exposes_a_device_whose_policy_trusts_the_server() -> None:
    # The control: semi-honest devices (no consistency check) fall to the split views,
    # which is why every device pins the threat model it runs instead of taking the
    # server's word. It also shows the transcript search finds an exposure when one exists.
    attack = _attack(ThreatModel.SEMI_HONEST)
    server = _server(
        attack,
        threat_model=ThreatModel.SEMI_HONEST,
        threshold=attack.least_threshold(6),
        authority_public_key=None,
    )
    masked = _through_masked_input(attack, server)
    victim = HONEST[0]
    everyone = tuple(sorted(masked))
    without_victim = tuple(n for n in everyone if n != victim)
    drawn = attack.adverts[victim].holders
    # Half the victim's honest holders see it survive, the other half see it drop.
    honest_holders = [h for h in drawn if h in HONEST]
    for index, node in enumerate(honest_holders):
        shown = everyone if index % 2 == 0 else without_victim
        attack.unmask(node, UnmaskRequest(shown, {}), server.round_id)

    assert attack.exposed(server.round_id) == [victim]
