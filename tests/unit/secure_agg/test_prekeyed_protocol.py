"""A round keyed in advance, in memory: exact sums, dropouts at every stage, state and wire."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pytest

from secure_agg import wire
from secure_agg.client import ClientSession, ClientStage
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import InvalidMessage
from secure_agg.identity import EnrolmentAuthority
from secure_agg.messages import (
    ConsistencyRequest,
    MaskedInput,
    MaskedInputRequest,
    PreKey,
    PrekeyedSetup,
    PrekeyedShares,
    UnmaskRequest,
)
from secure_agg.params import ThreatModel
from secure_agg.prekeys import PendingPreKey, prekey_problem
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession
from tests.unit.secure_agg.test_protocol import _policy, rng_ints

LENGTH = 64
ENCODING = EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=20, weight_cap=10)


def _round(
    num_clients: int,
    *,
    degree: int,
    threshold: int,
    threat: ThreatModel = ThreatModel.SEMI_HONEST,
    drop_at: Mapping[str, Iterable[int]] | None = None,
    seed: int = 0,
    through_bytes: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Run a round keyed in advance; return (total, expected sum of survivors, survivors).

    ``through_bytes``: every message goes through the wire codec and every client
    session is exported and restored between stages, as the Flower mod does.
    """
    drop = {stage: set(nodes) for stage, nodes in (drop_at or {}).items()}
    rng = DeterministicRandom(seed)
    authority = EnrolmentAuthority.generate(rng)
    nodes = [2000 + 3 * i for i in range(num_clients)]
    inputs = {n: rng_ints(seed, n) for n in nodes}
    active = threat is ThreatModel.ACTIVE
    identities = {n: authority.enrol(f"device-{n}", rng) if active else None for n in nodes}
    pending = {n: PendingPreKey.generate(n, DeterministicRandom(seed + n), now=0) for n in nodes}
    prekeys = {n: pending[n].announce(identities[n]) for n in nodes}
    for n, prekey in prekeys.items():
        assert (
            prekey_problem(prekey, node_id=n, threat_model=threat, authority=authority.public_key)
            is None
        )
    server = ServerSession(
        nodes,
        degree=degree,
        threshold=threshold,
        encoding=ENCODING,
        vector_length=LENGTH,
        threat_model=threat,
        rng=rng,
        authority_public_key=authority.public_key,
    )
    policy = _policy(threat, authority.public_key)

    def carried(message: object) -> object:
        return wire.decode(wire.encode(message), type(message)) if through_bytes else message

    def resumed(session: ClientSession, node: int) -> ClientSession:
        if not through_bytes:
            return session
        return ClientSession.restore(
            session.export_state(),
            policy=policy,
            rng=DeterministicRandom(seed + 7 * node),
            identity=identities[node],
        )

    setups = server.prekeyed_setups(prekeys)
    clients: dict[int, ClientSession] = {}
    replies = {}
    for n, sent in setups.items():
        if n in drop.get("prekeyed", set()):
            continue
        request = carried(sent)
        assert isinstance(request, PrekeyedSetup)
        client = ClientSession(
            request.setup,
            policy=policy,
            rng=DeterministicRandom(seed * 10_000 + n),
            identity=identities[n],
            prekey=pending[n],
        )
        replies[n] = carried(client.share_prekeyed(request.prekeys))
        clients[n] = resumed(client, n)
    masked_requests = server.receive_prekeyed(replies)  # type: ignore[arg-type]
    masked: dict[int, MaskedInput] = {}
    for n, mask_request in masked_requests.items():
        if n in drop.get("mask", set()):
            continue
        routed = carried(mask_request)
        assert isinstance(routed, MaskedInputRequest)
        masked[n] = clients[n].masked_input(routed, inputs[n])
        clients[n] = resumed(clients[n], n)
    after = server.receive_masked(masked)
    if active:
        signatures = {}
        for n, check in after.items():
            if n in drop.get("confirm", set()):
                continue
            assert isinstance(check, ConsistencyRequest)
            signatures[n] = clients[n].confirm(check)
            clients[n] = resumed(clients[n], n)
        unmask_requests = server.receive_signatures(signatures)
    else:
        unmask_requests = after  # type: ignore[assignment]
    responses = {}
    for n, unmask in unmask_requests.items():
        if n in drop.get("unmask", set()):
            continue
        assert isinstance(unmask, UnmaskRequest)
        responses[n] = clients[n].unmask(unmask)
    result = server.finish(responses)
    expected = np.zeros(LENGTH, dtype=np.uint32)
    for n in result.survivors:
        expected = expected + inputs[n]
    return result.total, expected, result.survivors


@pytest.mark.parametrize("threat", [ThreatModel.SEMI_HONEST, ThreatModel.ACTIVE])
@pytest.mark.parametrize("through_bytes", [False, True])
def test_no_dropouts_gives_the_exact_sum(threat: ThreatModel, through_bytes: bool) -> None:
    total, expected, survivors = _round(
        9, degree=6, threshold=4, threat=threat, through_bytes=through_bytes
    )

    assert len(survivors) == 9
    np.testing.assert_array_equal(total, expected)


@pytest.mark.parametrize(
    "drop_at",
    [
        {"prekeyed": [2003]},
        {"mask": [2006, 2012]},
        {"unmask": [2009]},
        {"prekeyed": [2000], "mask": [2015], "unmask": [2021]},
    ],
    ids=["at-setup", "at-masked-input", "at-unmask", "at-every-stage"],
)
def test_dropouts_at_every_stage_still_give_the_survivors_exact_sum(
    drop_at: dict[str, list[int]],
) -> None:
    total, expected, survivors = _round(10, degree=8, threshold=4, drop_at=drop_at)

    dropped_before_sum = set(drop_at.get("prekeyed", [])) | set(drop_at.get("mask", []))
    assert not dropped_before_sum & set(survivors)
    assert set(drop_at.get("unmask", [])) <= set(survivors)
    np.testing.assert_array_equal(total, expected)


def test_active_model_with_a_dropout_in_the_consistency_check() -> None:
    total, expected, survivors = _round(
        10, degree=8, threshold=5, threat=ThreatModel.ACTIVE, drop_at={"confirm": [2006]}
    )

    assert 2006 in survivors
    np.testing.assert_array_equal(total, expected)


def _session(node: int, *, prekey: PendingPreKey | None) -> tuple[ClientSession, ServerSession]:
    nodes = [1, 2, 3, 4]
    server = ServerSession(
        nodes,
        degree=2,
        threshold=2,
        encoding=ENCODING,
        vector_length=LENGTH,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=DeterministicRandom(3),
    )
    setup = server.setups()[node]
    policy = _policy(ThreatModel.SEMI_HONEST, bytes(32))
    return ClientSession(setup, policy=policy, rng=DeterministicRandom(4), prekey=prekey), server


def test_a_classic_session_refuses_a_round_keyed_in_advance() -> None:
    client, _ = _session(1, prekey=None)

    with pytest.raises(InvalidMessage, match="not keyed in advance"):
        client.share_prekeyed(())


def test_a_session_keyed_in_advance_has_no_share_keys_stage() -> None:
    keys = {n: PendingPreKey.generate(n, DeterministicRandom(n), now=0) for n in (1, 2, 3, 4)}
    client, _ = _session(1, prekey=keys[1])
    client.share_prekeyed(tuple(keys[n].announce(None) for n in (1, 2, 3, 4)))

    assert client.stage is ClientStage.SHARED
    with pytest.raises(InvalidMessage, match="out of order"):
        client.advertise()


def test_a_pre_key_list_must_name_every_participant_once() -> None:
    keys = {n: PendingPreKey.generate(n, DeterministicRandom(n), now=0) for n in (1, 2, 3, 4)}
    client, _ = _session(1, prekey=keys[1])

    with pytest.raises(InvalidMessage, match="one pre-key per participant"):
        client.share_prekeyed(tuple(keys[n].announce(None) for n in (1, 2, 3)))
    assert client.stage is ClientStage.CREATED


def test_a_pre_key_for_another_node_is_refused() -> None:
    key = PendingPreKey.generate(2, DeterministicRandom(2), now=0)

    with pytest.raises(InvalidMessage, match="another node"):
        _session(1, prekey=key)


def test_pending_keys_survive_their_bytes_and_damage_is_refused() -> None:
    key = PendingPreKey.generate(5, DeterministicRandom(5), now=1234)

    back = PendingPreKey.from_bytes(key.to_bytes())

    assert back == key
    announced = key.announce(None)
    assert (announced.enc_public, announced.mask_public) == (back.enc.public, back.mask.public)
    with pytest.raises(InvalidMessage):
        PendingPreKey.from_bytes(key.to_bytes()[:-1])
    with pytest.raises(InvalidMessage):
        PendingPreKey.from_bytes(b"\x09" + key.to_bytes()[1:])


def test_the_server_keeps_no_pre_key_it_cannot_check() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(8))
    identity = authority.enrol("device-1", DeterministicRandom(9))
    key = PendingPreKey.generate(1, DeterministicRandom(1), now=0)
    signed = key.announce(identity)
    active = {"threat_model": ThreatModel.ACTIVE, "authority": authority.public_key}

    assert prekey_problem(signed, node_id=1, **active) is None  # type: ignore[arg-type]
    assert prekey_problem(signed, node_id=2, **active) == "pre-key for another node"  # type: ignore[arg-type]
    assert prekey_problem(key.announce(None), node_id=1, **active) == "unsigned pre-key"  # type: ignore[arg-type]
    other = PendingPreKey.generate(1, DeterministicRandom(2), now=0)
    swapped = PreKey(
        node_id=1,
        enc_public=other.enc.public,
        mask_public=signed.mask_public,
        certificate=signed.certificate,
        signature=signed.signature,
    )
    assert "invalid" in (prekey_problem(swapped, node_id=1, **active) or "")  # type: ignore[arg-type]


def test_prekeyed_messages_round_trip_through_the_codec() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(8))
    identity = authority.enrol("device-1", DeterministicRandom(9))
    keys = [PendingPreKey.generate(n, DeterministicRandom(n), now=0) for n in (1, 2, 3, 4)]
    prekeys = tuple(k.announce(identity if k.node_id == 1 else None) for k in keys)
    client, _ = _session(1, prekey=keys[0])
    setup = PrekeyedSetup(client.setup, prekeys)

    decoded = wire.decode(wire.encode(setup), PrekeyedSetup)
    fast = wire.encode_prekeyed_setup(client.setup, wire.prekey_list(prekeys))

    assert decoded == setup
    assert fast == wire.encode(setup)
    reply = client.share_prekeyed(prekeys)
    assert wire.decode(wire.encode(reply), PrekeyedShares) == reply
    unsorted = PrekeyedSetup(client.setup, prekeys[::-1])
    with pytest.raises(InvalidMessage, match="sorted"):
        wire.decode(wire.encode(unsorted), PrekeyedSetup)
