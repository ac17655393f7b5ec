"""A whole SecAgg+ round in memory: exact sums, dropouts at every stage, misbehaviour."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import pytest

from secure_agg.client import ClientSession
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import CryptoError, InvalidMessage, ProtocolAbort
from secure_agg.identity import EnrolmentAuthority
from secure_agg.messages import ConsistencyRequest, MaskedInputRequest, UnmaskRequest
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession

LENGTH = 64
ENCODING = EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=20, weight_cap=10)


def _policy(threat: ThreatModel, authority: bytes | None) -> ProtocolPolicy:
    # No corrupt client assumed: these tests choose small k and t on purpose.
    return ProtocolPolicy(
        threat_model=threat,
        authority_public_key=authority if threat is ThreatModel.ACTIVE else None,
        corrupt_fraction=0.0,
        min_degree=1,
    )


def _round(
    num_clients: int,
    *,
    degree: int,
    threshold: int,
    threat: ThreatModel = ThreatModel.SEMI_HONEST,
    drop_at: Mapping[str, Iterable[int]] | None = None,
    seed: int = 0,
    excluded: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Run a round; return (unmasked total, expected sum of survivors, survivors).

    ``excluded`` receives the clients the server left out without them dropping.
    """
    drop = {stage: set(nodes) for stage, nodes in (drop_at or {}).items()}
    rng = DeterministicRandom(seed)
    authority = EnrolmentAuthority.generate(rng)
    nodes = [1000 + 7 * i for i in range(num_clients)]
    inputs = {n: rng_ints(seed, n) for n in nodes}
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
    clients = {
        n: ClientSession(
            setup,
            policy=policy,
            rng=DeterministicRandom(seed * 10_000 + n),
            identity=authority.enrol(f"device-{n}", rng) if threat is ThreatModel.ACTIVE else None,
        )
        for n, setup in server.setups().items()
    }

    def alive(stage: str, requests: Mapping[int, object]) -> list[int]:
        return [n for n in requests if n not in drop.get(stage, set())]

    share_requests = server.receive_adverts(
        {n: c.advertise() for n, c in clients.items() if n not in drop.get("advertise", set())}
    )
    masked_requests = server.receive_shares(
        {n: clients[n].share_keys(share_requests[n]) for n in alive("share", share_requests)}
    )
    next_requests = server.receive_masked(
        {
            n: clients[n].masked_input(masked_requests[n], inputs[n])
            for n in alive("mask", masked_requests)
        }
    )
    if threat is ThreatModel.ACTIVE:
        assert all(isinstance(r, ConsistencyRequest) for r in next_requests.values())
        unmask_requests = server.receive_signatures(
            {
                n: clients[n].confirm(r)  # type: ignore[arg-type]
                for n, r in next_requests.items()
                if n not in drop.get("confirm", set())
            }
        )
    else:
        unmask_requests = next_requests  # type: ignore[assignment]
    result = server.finish(
        {
            n: clients[n].unmask(r)
            for n, r in unmask_requests.items()
            if n not in drop.get("unmask", set())
        }
    )
    if excluded is not None:
        excluded.extend(result.excluded)
    expected = np.zeros(LENGTH, dtype=np.uint32)
    for n in result.survivors:
        expected = expected + inputs[n]
    return result.total, expected, result.survivors


def rng_ints(seed: int, node: int) -> np.ndarray:
    raw = DeterministicRandom(seed * 1_000_003 + node).random_bytes(4 * LENGTH)
    return (np.frombuffer(raw, dtype=np.uint32) >> np.uint32(8)).astype(np.uint32)


@pytest.mark.parametrize("threat", list(ThreatModel))
def test_no_dropouts_gives_the_exact_sum(threat: ThreatModel) -> None:
    total, expected, survivors = _round(8, degree=4, threshold=3, threat=threat)

    assert len(survivors) == 8
    np.testing.assert_array_equal(total, expected)


def test_classic_secagg_with_the_complete_graph() -> None:
    total, expected, _ = _round(6, degree=10, threshold=4)

    np.testing.assert_array_equal(total, expected)


@pytest.mark.parametrize(
    "drop_at",
    [
        {"advertise": [1007]},
        {"share": [1014]},
        {"mask": [1021, 1049]},
        {"unmask": [1028]},
        {"advertise": [1000], "share": [1035], "mask": [1042], "unmask": [1063]},
    ],
)
def test_dropouts_at_every_stage_still_give_the_survivors_exact_sum(
    drop_at: dict[str, list[int]],
) -> None:
    total, expected, survivors = _round(12, degree=10, threshold=5, drop_at=drop_at, seed=3)

    np.testing.assert_array_equal(total, expected)
    dropped_before_unmask = {
        n for stage in ("advertise", "share", "mask") for n in drop_at.get(stage, [])
    }
    assert dropped_before_unmask.isdisjoint(survivors)


def test_active_model_with_a_dropout_in_the_consistency_check() -> None:
    total, expected, survivors = _round(
        10, degree=8, threshold=5, threat=ThreatModel.ACTIVE, drop_at={"confirm": [1007]}, seed=5
    )

    # Dropping at the consistency check is after the masked input: still summed.
    assert 1007 in survivors
    np.testing.assert_array_equal(total, expected)


def test_too_many_dropouts_abort_the_round() -> None:
    with pytest.raises(ProtocolAbort, match="share-keys: 0 clients left"):
        _round(8, degree=6, threshold=5, drop_at={"share": [1000, 1007, 1014]})


def _through_shares(
    seed: int,
    nodes: list[int],
    *,
    degree: int,
    threshold: int,
    length: int = 4,
    threat: ThreatModel = ThreatModel.SEMI_HONEST,
) -> tuple[ServerSession, dict[int, ClientSession], dict[int, MaskedInputRequest]]:
    """Run a round up to the masked-input requests; every client takes part."""
    rng = DeterministicRandom(seed)
    authority = EnrolmentAuthority.generate(rng)
    active = threat is ThreatModel.ACTIVE
    server = ServerSession(
        nodes,
        degree=degree,
        threshold=threshold,
        encoding=ENCODING,
        vector_length=length,
        threat_model=threat,
        rng=rng,
        authority_public_key=authority.public_key if active else None,
    )
    policy = _policy(threat, authority.public_key)
    clients = {
        n: ClientSession(
            s,
            policy=policy,
            rng=DeterministicRandom(n + seed),
            identity=authority.enrol(str(n), rng) if active else None,
        )
        for n, s in server.setups().items()
    }
    shares = server.receive_adverts({n: c.advertise() for n, c in clients.items()})
    routed = server.receive_shares({n: clients[n].share_keys(shares[n]) for n in clients})
    return server, clients, routed


def _masked_zeros(clients: dict[int, ClientSession], routed: dict[int, MaskedInputRequest]) -> None:
    for n, client in clients.items():
        client.masked_input(routed[n], np.zeros(4, dtype=np.uint32))


def test_masked_vectors_look_uniform_and_hide_the_input() -> None:
    _, clients, routed = _through_shares(11, [1, 2, 3], degree=2, threshold=2, length=20_000)

    masked = clients[1].masked_input(routed[1], np.zeros(20_000, dtype=np.uint32)).vector

    counts = np.bincount((masked & 0xFF).astype(np.int64), minlength=256)
    chi2 = float(((counts - len(masked) / 256) ** 2 / (len(masked) / 256)).sum())
    assert 196 < chi2 < 330
    assert np.count_nonzero(masked == 0) < 5


def test_a_client_refuses_to_reveal_without_enough_confirmations() -> None:
    _, clients, routed = _through_shares(
        12, [1, 2, 3, 4], degree=3, threshold=3, threat=ThreatModel.ACTIVE
    )
    _masked_zeros(clients, routed)
    survivors = (1, 2, 3, 4)
    signatures = {n: clients[n].confirm(ConsistencyRequest(survivors)).signature for n in (1, 2)}
    clients[3].confirm(ConsistencyRequest(survivors))

    with pytest.raises(ProtocolAbort, match="2 of this client's holders confirmed"):
        clients[3].unmask(UnmaskRequest(survivors, signatures))


def test_an_equivocating_server_is_caught_by_the_consistency_check() -> None:
    _, clients, routed = _through_shares(
        13, [1, 2, 3, 4], degree=3, threshold=2, threat=ThreatModel.ACTIVE
    )
    _masked_zeros(clients, routed)
    # The server tells 1 and 2 that node 4 survived, and 3 that it dropped.
    with_four = (1, 2, 3, 4)
    without_four = (1, 2, 3)
    signatures = {n: clients[n].confirm(ConsistencyRequest(with_four)).signature for n in (1, 2)}
    clients[3].confirm(ConsistencyRequest(without_four))

    with pytest.raises(CryptoError):
        clients[3].unmask(UnmaskRequest(without_four, signatures))


def test_messages_out_of_order_or_replayed_are_refused() -> None:
    rng = DeterministicRandom(14)
    server = ServerSession(
        [1, 2, 3],
        degree=2,
        threshold=2,
        encoding=ENCODING,
        vector_length=4,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=rng,
    )
    setups = server.setups()
    client = ClientSession(
        setups[1], policy=_policy(ThreatModel.SEMI_HONEST, None), rng=DeterministicRandom(1)
    )

    with pytest.raises(InvalidMessage, match="out of order"):
        client.masked_input(MaskedInputRequest((), {}), np.zeros(4, dtype=np.uint32))
    client.advertise()
    with pytest.raises(InvalidMessage, match="out of order"):
        client.advertise()
    with pytest.raises(InvalidMessage, match="out of order"):
        server.setups()


def test_shares_sealed_for_another_round_are_rejected() -> None:
    _, clients_a, _ = _through_shares(20, [1, 2, 3], degree=2, threshold=2)
    _, _, routed_b = _through_shares(21, [1, 2, 3], degree=2, threshold=2)

    # Neither bundle opens: both senders are rejected, and without them the
    # client's own secrets have too few holders to go on.
    with pytest.raises(ProtocolAbort, match="0 of this client's holders shared keys"):
        clients_a[1].masked_input(routed_b[1], np.zeros(4, dtype=np.uint32))


def test_a_sender_whose_bundle_does_not_open_is_dropped_and_the_round_goes_on() -> None:
    nodes = [1, 2, 3, 4, 5, 6]
    server, clients, routed = _through_shares(22, nodes, degree=5, threshold=3)
    inputs = {n: np.full(4, 10 * n, dtype=np.uint32) for n in nodes}
    # Node 4 (or the network) spoils the bundle it sent to node 1.
    spoiled = dict(routed[1].ciphertexts)
    spoiled[4] = spoiled[4][:-1] + bytes([spoiled[4][-1] ^ 1])
    routed[1] = MaskedInputRequest(routed[1].partners, spoiled)

    masked = {n: clients[n].masked_input(routed[n], inputs[n]) for n in nodes}
    requests = server.receive_masked(masked)
    result = server.finish({n: clients[n].unmask(r) for n, r in requests.items()})  # type: ignore[arg-type]

    assert masked[1].rejected == (4,)
    assert result.survivors == (1, 2, 3, 5, 6) and 4 in result.excluded
    assert "did not open at node 1" in server.excluded[4]
    np.testing.assert_array_equal(result.total, sum(inputs[n] for n in result.survivors))


def test_a_lying_share_holder_is_outvoted_by_the_commitment() -> None:
    nodes = [1, 2, 3, 4, 5]
    server, clients, routed = _through_shares(15, nodes, degree=4, threshold=2)
    inputs = {n: np.full(4, n, dtype=np.uint32) for n in nodes}
    requests = server.receive_masked(
        {n: clients[n].masked_input(routed[n], inputs[n]) for n in nodes}
    )
    responses = {n: clients[n].unmask(r) for n, r in requests.items()}  # type: ignore[arg-type]
    lying = responses[1]
    forged = {o: (s + 1) % 5 for o, s in lying.self_mask_shares.items()}
    responses[1] = replace(lying, self_mask_shares=forged)

    result = server.finish(responses)

    np.testing.assert_array_equal(result.total, np.full(4, sum(nodes), dtype=np.uint32))
