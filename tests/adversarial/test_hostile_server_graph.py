"""A hostile server against rounds on a server-drawn graph: what the two-trip round lets it do.

The devices are the real client mod reached through Flower messages and the real codec
(:mod:`tests.adversarial.hostile`). A server-drawn graph is a semi-honest device's opt-in;
the attacks here are what a server that deviates anyway can try through it: send it to a
device that never opted in, hand out holders that are not k other participants, and, at
unmask, ask for more than the seeds of clients outside the sum. Each is refused before
the device trains, or answered with nothing a client's own unmask would not reveal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from flwr.app import Context, Message

from fl_client.policy import DevicePolicy
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import (
    PREKEY_FIELD,
    PREKEY_RECORD_KEY,
    VECTOR_KEY,
    VECTOR_RECORD_KEY,
    Stage,
)
from secure_agg.identity import EnrolmentAuthority
from secure_agg.messages import (
    GraphSetup,
    MaskedInput,
    PreKey,
    PrekeyedShares,
    PreKeyRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession
from tests.adversarial.hostile import (
    MODEL_SIZE,
    Fleet,
    decode,
    enrol,
    error_of,
    model_content,
    train,
)

NODES = list(range(301, 309))
ENCODING = EncodingConfig(clip_range=0.5, ring_bits=32, max_clients=8, weight_cap=10)
OPTED_IN = DevicePolicy(
    protocol=ProtocolPolicy(
        threat_model=ThreatModel.SEMI_HONEST,
        corrupt_fraction=0.0,
        min_degree=1,
        min_survivors=5,
        accept_server_graph=True,
    )
)


class _Trainer:
    """The device's train handler, counting the times it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message, context: Context) -> Message:
        self.calls += 1
        return train(msg, context)


def _announced(fleet: Fleet) -> dict[int, PreKey]:
    return {
        n: decode(fleet.send(n, Stage.PREKEY, b"p" * 16, PreKeyRequest(n)), PreKey)
        for n in fleet.nodes
    }


def _server() -> ServerSession:
    return ServerSession(
        NODES,
        degree=4,
        threshold=3,
        encoding=ENCODING,
        vector_length=MODEL_SIZE + 1,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=DeterministicRandom(5),
        server_graph=True,
    )


def _first_trip(
    fleet: Fleet, server: ServerSession, setups: dict[int, GraphSetup], handler: _Trainer
) -> dict[int, Message]:
    return {
        n: fleet.send(
            n,
            Stage.KEYED_MASKED_INPUT,
            server.round_id,
            request,
            base=model_content(),
            handler=handler,
        )
        for n, request in setups.items()
    }


def test_a_device_that_did_not_opt_in_refuses_before_training_and_spends_its_key() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    for policy, identities in (
        (DevicePolicy(protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST)), {}),
        (
            DevicePolicy(
                protocol=ProtocolPolicy(
                    threat_model=ThreatModel.ACTIVE, authority_public_key=authority.public_key
                )
            ),
            enrol(NODES, authority),
        ),
    ):
        fleet = Fleet(NODES, policy, identities)
        server = _server()
        setups = server.graph_setups(_announced(fleet))
        trainer = _Trainer()

        replies = _first_trip(fleet, server, setups, trainer)

        for node, reply in replies.items():
            reason = error_of(reply)
            assert "does not let the server draw" in reason or "policy requires active" in reason
            assert not fleet.holds_state(node)
        assert trainer.calls == 0
        # The key named in the refused round is gone: it cannot be replayed.
        again = fleet.send(NODES[0], Stage.KEYED_MASKED_INPUT, server.round_id, setups[NODES[0]])
        assert "holds no pre-key" in error_of(again)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda holders, me: holders[:-1],
        lambda holders, me: tuple(sorted({*holders[1:], me})),
        lambda holders, me: (*holders[:-1], 999),
    ],
    ids=["too-few", "itself", "outsider"],
)
def test_holders_that_are_not_k_other_participants_are_refused_before_training(
    tamper: Callable[[tuple[int, ...], int], tuple[int, ...]],
) -> None:
    fleet = Fleet(NODES, OPTED_IN, {})
    server = _server()
    setups = server.graph_setups(_announced(fleet))
    victim = NODES[2]
    trainer = _Trainer()
    forged = replace(setups[victim], holders=tamper(setups[victim].holders, victim))

    reply = _first_trip(fleet, server, {victim: forged}, trainer)[victim]

    assert "not 4 other participants" in error_of(reply)
    assert trainer.calls == 0 and not fleet.holds_state(victim)


def _honest_first_trip(fleet: Fleet) -> tuple[ServerSession, dict[int, UnmaskRequest]]:
    server = _server()
    setups = server.graph_setups(_announced(fleet))
    replies = _first_trip(fleet, server, setups, _Trainer())
    decoded = {}
    for node, reply in replies.items():
        shares = decode(reply, PrekeyedShares)
        vector = reply.content.array_records[VECTOR_RECORD_KEY][VECTOR_KEY].numpy()
        decoded[node] = (shares, MaskedInput(node_id=node, vector=vector))
    return server, server.receive_graph(decoded)


def _unmask(fleet: Fleet, server: ServerSession, node: int, request: UnmaskRequest) -> Message:
    return fleet.send(node, Stage.UNMASK, server.round_id, request)


def test_with_everyone_in_the_sum_a_device_reveals_self_mask_shares_only() -> None:
    fleet = Fleet(NODES, OPTED_IN, {})
    server, requests = _honest_first_trip(fleet)

    for node, request in requests.items():
        reply = _unmask(fleet, server, node, request)
        response = decode(reply, UnmaskResponse)
        assert response.self_mask_shares, "it holds bundles of the clients that drew it"
        assert not response.mask_key_shares
        assert not response.pairwise_seeds and not response.pair_seed_shares
        # Its next pre-key rides on the last reply, as in every round keyed in advance.
        assert PREKEY_FIELD in reply.content.config_records[PREKEY_RECORD_KEY]


def test_a_device_reveals_seeds_only_with_partners_the_server_calls_outside_the_sum() -> None:
    fleet = Fleet(NODES, OPTED_IN, {})
    server, requests = _honest_first_trip(fleet)
    left_out = NODES[6]
    survivors = tuple(n for n in NODES if n != left_out)
    revealed_pairs = 0

    for node in survivors:
        request = replace(requests[node], survivors=survivors)
        response = decode(_unmask(fleet, server, node, request), UnmaskResponse)

        # Self-mask shares only of survivors, the key share only of the one left out,
        # seeds and seed shares only with it: never two secrets of one sender.
        assert set(response.self_mask_shares) <= set(survivors)
        assert set(response.mask_key_shares) <= {left_out}
        assert set(response.pairwise_seeds) <= {left_out}
        for owner, by_partner in response.pair_seed_shares.items():
            assert owner in response.self_mask_shares and set(by_partner) == {left_out}
            revealed_pairs += 1
    # Its neighbours' holders did reveal their seeds with it (the test is not vacuous).
    assert revealed_pairs > 0


def test_an_unmask_below_the_policys_fewest_survivors_reveals_nothing() -> None:
    fleet = Fleet(NODES, OPTED_IN, {})
    server, requests = _honest_first_trip(fleet)
    victim = NODES[1]
    request = replace(requests[victim], survivors=tuple(NODES[:4]))

    reply = _unmask(fleet, server, victim, request)

    assert "survivor" in error_of(reply)
    assert not fleet.holds_state(victim)


def test_bundles_the_device_was_never_sent_are_refused() -> None:
    fleet = Fleet(NODES, OPTED_IN, {})
    server, requests = _honest_first_trip(fleet)
    victim = NODES[3]
    stranger = next(n for n in NODES if n != victim and n not in requests[victim].ciphertexts)
    forged = dict(requests[victim].ciphertexts)
    forged[stranger] = next(iter(forged.values()))
    request = replace(requests[victim], ciphertexts=forged)

    reply = _unmask(fleet, server, victim, request)

    assert "did not draw this one" in error_of(reply)
    assert not fleet.holds_state(victim)
