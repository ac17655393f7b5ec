"""The wire codec and resumable client sessions: a round through bytes only, and bad bytes."""

from __future__ import annotations

import struct
from typing import TypeVar

import numpy as np
import pytest

from secure_agg import wire
from secure_agg.client import ClientSession, ClientStage
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import InvalidMessage
from secure_agg.identity import EnrolmentAuthority
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
)
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession

LENGTH = 33
ENCODING = EncodingConfig(clip_range=0.5, ring_bits=32, max_clients=10, weight_cap=100)


T = TypeVar("T")


def _via_wire(message: T) -> T:
    return wire.decode(wire.encode(message), type(message))


def test_a_whole_active_round_through_bytes_and_restored_sessions() -> None:
    rng = DeterministicRandom(7)
    authority = EnrolmentAuthority.generate(rng)
    nodes = [11, 22, 33, 44, 55, 66]
    identities = {n: authority.enrol(f"dev-{n}", rng) for n in nodes}
    inputs = {n: np.arange(LENGTH, dtype=np.uint32) * np.uint32(n) for n in nodes}
    server = ServerSession(
        nodes,
        degree=4,
        threshold=3,
        encoding=ENCODING,
        vector_length=LENGTH,
        threat_model=ThreatModel.ACTIVE,
        rng=rng,
        authority_public_key=authority.public_key,
    )
    states: dict[int, bytes] = {}
    policy = ProtocolPolicy(
        threat_model=ThreatModel.ACTIVE,
        authority_public_key=authority.public_key,
        corrupt_fraction=0.0,
    )

    def step(node: int, stage: str, request: object) -> object:
        session = ClientSession.restore(
            states[node], policy=policy, rng=rng, identity=identities[node]
        )
        out = getattr(session, stage)(_via_wire(request))
        states[node] = session.export_state()
        return _via_wire(out)

    adverts = {}
    for node, setup in server.setups().items():
        session = ClientSession(_via_wire(setup), policy=policy, rng=rng, identity=identities[node])
        adverts[node] = _via_wire(session.advertise())
        states[node] = session.export_state()
    share_requests = server.receive_adverts(adverts)
    shares = {n: step(n, "share_keys", r) for n, r in share_requests.items()}
    dropped = 44  # drops after sharing its keys: its masks must be reconstructed
    masked_requests = server.receive_shares(shares)  # type: ignore[arg-type]
    masked = {}
    for n, request in masked_requests.items():
        if n == dropped:
            continue
        session = ClientSession.restore(states[n], policy=policy, rng=rng, identity=identities[n])
        masked[n] = session.masked_input(_via_wire(request), inputs[n])
        states[n] = session.export_state()
    confirm = server.receive_masked(masked)
    signatures = {n: step(n, "confirm", r) for n, r in confirm.items()}
    unmask = server.receive_signatures(signatures)  # type: ignore[arg-type]
    responses = {n: step(n, "unmask", r) for n, r in unmask.items()}
    result = server.finish(responses)  # type: ignore[arg-type]

    expected = sum(inputs[n] for n in nodes if n != dropped)
    np.testing.assert_array_equal(result.total, expected)
    assert result.dropped == (dropped,)
    restored = ClientSession.restore(states[11], policy=policy, rng=rng, identity=identities[11])
    assert restored.stage is ClientStage.DONE


def _samples() -> list[object]:
    rng = DeterministicRandom(1)
    identity = EnrolmentAuthority.generate(rng).enrol("dev", rng)
    advert = KeyAdvertisement(
        node_id=3,
        enc_public=b"e" * 32,
        mask_public=b"m" * 32,
        self_mask_commitment=b"c" * 32,
        holders=(1, 9),
        setup_digest=b"d" * 32,
        certificate=identity.certificate,
        signature=b"s" * 64,
    )
    share = np.arange(11, dtype=np.uint32)
    return [
        RoundSetup(
            round_id=b"r" * 16,
            node_id=2**63,
            participants=(1, 5, 9, 2**63),
            degree=2,
            threshold=2,
            encoding=ENCODING,
            vector_length=LENGTH,
            threat_model=ThreatModel.SEMI_HONEST,
        ),
        advert,
        ShareKeysRequest(
            (
                advert,
                KeyAdvertisement(
                    node_id=4,
                    enc_public=b"e" * 32,
                    mask_public=b"m" * 32,
                    self_mask_commitment=b"c" * 32,
                    holders=(),
                    setup_digest=b"d" * 32,
                ),
            )
        ),
        EncryptedShares(node_id=3, ciphertexts={1: b"abc", 9: b""}),
        MaskedInputRequest((1, 4), {1: b"x" * 140}),
        MaskedInputReport(node_id=3, rejected=(4, 5)),
        ConsistencyRequest((1, 2, 3)),
        ConsistencySignature(node_id=3, signature=b"z" * 64),
        UnmaskRequest((1, 2), {1: b"q" * 64}),
        UnmaskResponse(
            node_id=3,
            self_mask_shares={1: share},
            mask_key_shares={2: share + 1},
            pairwise_seeds={4: b"p" * 32},
        ),
    ]


@pytest.mark.parametrize("message", _samples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: object) -> None:
    decoded = _via_wire(message)

    if isinstance(message, UnmaskResponse):
        assert isinstance(decoded, UnmaskResponse)
        assert decoded.node_id == message.node_id
        assert decoded.pairwise_seeds == message.pairwise_seeds
        for got, want in (
            (decoded.self_mask_shares, message.self_mask_shares),
            (decoded.mask_key_shares, message.mask_key_shares),
        ):
            assert set(got) == set(want)
            for node in want:
                np.testing.assert_array_equal(got[node], want[node])
    else:
        assert decoded == message


@pytest.mark.parametrize("message", _samples(), ids=lambda m: type(m).__name__)
def test_truncated_or_padded_messages_are_rejected(message: object) -> None:
    data = wire.encode(message)

    with pytest.raises(InvalidMessage, match="truncated"):
        wire.decode(data[:-1], type(message))
    with pytest.raises(InvalidMessage, match="trailing"):
        wire.decode(data + b"\0", type(message))


def test_a_message_of_another_type_or_version_is_rejected() -> None:
    data = wire.encode(ConsistencyRequest((1, 2)))

    with pytest.raises(InvalidMessage, match="not a UnmaskRequest"):
        wire.decode(data, UnmaskRequest)
    with pytest.raises(InvalidMessage, match="version"):
        wire.decode(data[:1] + b"\x09" + data[2:], ConsistencyRequest)
    with pytest.raises(InvalidMessage, match="no wire format"):
        wire.encode(MaskedInput(node_id=1, vector=np.zeros(2, dtype=np.uint32)))
    with pytest.raises(InvalidMessage, match="expected bytes"):
        wire.decode("text", ConsistencyRequest)  # type: ignore[arg-type]


def test_duplicate_ids_and_huge_counts_are_rejected() -> None:
    header = wire.encode(ConsistencyRequest(()))[:2]
    duplicate = header + struct.pack(">IQQ", 2, 5, 5)
    huge = header + struct.pack(">I", wire.MAX_NODES + 1)

    with pytest.raises(InvalidMessage, match="duplicate"):
        wire.decode(duplicate, ConsistencyRequest)
    with pytest.raises(InvalidMessage, match="exceed the limit"):
        wire.decode(huge, ConsistencyRequest)


def test_a_setup_with_an_impossible_encoding_or_length_is_rejected() -> None:
    setup = _samples()[0]
    assert isinstance(setup, RoundSetup)
    data = bytearray(wire.encode(setup))
    # tag, version, round id, node, participants, k, t, clip
    bits_at = 2 + 4 + 16 + 8 + 4 + 4 * 8 + 4 + 4 + 8
    data[bits_at] = 200

    with pytest.raises(InvalidMessage, match="ring_bits"):
        wire.decode(bytes(data), RoundSetup)
    with pytest.raises(InvalidMessage, match="expected 64 bytes"):
        wire.encode(ConsistencySignature(node_id=1, signature=b"short"))


def test_a_corrupt_client_state_is_rejected() -> None:
    rng = DeterministicRandom(3)
    server = ServerSession(
        [1, 2, 3],
        degree=2,
        threshold=2,
        encoding=ENCODING,
        vector_length=LENGTH,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=rng,
    )
    policy = ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST)
    session = ClientSession(server.setups()[1], policy=policy, rng=rng)
    state = session.export_state()

    with pytest.raises(InvalidMessage, match="state version"):
        ClientSession.restore(b"\x07" + state[1:], policy=policy, rng=rng)
    with pytest.raises(InvalidMessage):
        ClientSession.restore(state[:-3], policy=policy, rng=rng)
    assert ClientSession.restore(state, policy=policy, rng=rng).round_id == server.round_id
