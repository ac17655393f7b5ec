"""A round on a server-drawn graph (semi-honest), in memory: two trips, exact sums, dropouts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import pytest

from fedge.errors import ConfigError
from secure_agg import wire
from secure_agg.client import ClientSession, ClientStage
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import InvalidMessage, PolicyViolation, ProtocolAbort
from secure_agg.identity import EnrolmentAuthority
from secure_agg.messages import GraphSetup, PrekeyedShares, UnmaskRequest
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.prekeys import PendingPreKey
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession
from tests.unit.secure_agg.test_protocol import rng_ints

LENGTH = 64
ENCODING = EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=20, weight_cap=10)
POLICY = ProtocolPolicy(
    threat_model=ThreatModel.SEMI_HONEST,
    corrupt_fraction=0.0,
    min_degree=1,
    accept_server_graph=True,
)


def _server(nodes: list[int], *, degree: int, threshold: int, seed: int = 0) -> ServerSession:
    return ServerSession(
        nodes,
        degree=degree,
        threshold=threshold,
        encoding=ENCODING,
        vector_length=LENGTH,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=DeterministicRandom(seed),
        server_graph=True,
    )


def _keyed(
    nodes: list[int], *, degree: int, threshold: int
) -> tuple[ServerSession, dict[int, PendingPreKey], dict[int, GraphSetup]]:
    """A server-drawn graph's server, every device's pending key, and each one's setup."""
    server = _server(nodes, degree=degree, threshold=threshold)
    pending = {n: PendingPreKey.generate(n, DeterministicRandom(n), now=0) for n in nodes}
    return server, pending, server.graph_setups({n: p.announce(None) for n, p in pending.items()})


def _round(
    num_clients: int,
    *,
    degree: int,
    threshold: int,
    drop_at: Mapping[str, Iterable[int]] | None = None,
    seed: int = 0,
    through_bytes: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], ServerSession]:
    """Run a round; return (total, expected sum of survivors, survivors, server)."""
    drop = {stage: set(nodes) for stage, nodes in (drop_at or {}).items()}
    nodes = [3000 + 7 * i for i in range(num_clients)]
    inputs = {n: rng_ints(seed, n) for n in nodes}
    pending = {n: PendingPreKey.generate(n, DeterministicRandom(seed + n), now=0) for n in nodes}
    prekeys = {n: pending[n].announce(None) for n in nodes}
    server = _server(nodes, degree=degree, threshold=threshold, seed=seed)

    def carried(message: object) -> object:
        return wire.decode(wire.encode(message), type(message)) if through_bytes else message

    clients: dict[int, ClientSession] = {}
    replies = {}
    for n, sent in server.graph_setups(prekeys).items():
        if n in drop.get("first", set()):
            continue
        request = carried(sent)
        assert isinstance(request, GraphSetup)
        client = ClientSession(
            request.setup,
            policy=POLICY,
            rng=DeterministicRandom(seed * 10_000 + n),
            prekey=pending[n],
            holders=request.holders,
        )
        shares, masked = client.share_and_mask(request.prekeys, request.drawn_by, inputs[n])
        assert client.stage is ClientStage.MASKED
        replies[n] = (carried(shares), replace(masked, vector=masked.vector.copy()))
        if through_bytes:
            client = ClientSession.restore(
                client.export_state(), policy=POLICY, rng=DeterministicRandom(seed + 7 * n)
            )
        clients[n] = client
    unmask_requests = server.receive_graph(replies)  # type: ignore[arg-type]
    responses = {}
    for n, unmask in unmask_requests.items():
        if n in drop.get("unmask", set()):
            continue
        request = carried(unmask)
        assert isinstance(request, UnmaskRequest)
        responses[n] = clients[n].unmask(request)
    result = server.finish(responses)
    expected = np.zeros(LENGTH, dtype=np.uint32)
    for n in result.survivors:
        expected = expected + inputs[n]
    return result.total, expected, result.survivors, server


@pytest.mark.parametrize("through_bytes", [False, True])
def test_no_dropouts_gives_the_exact_sum(through_bytes: bool) -> None:
    total, expected, survivors, _ = _round(8, degree=4, threshold=3, through_bytes=through_bytes)

    assert len(survivors) == 8
    np.testing.assert_array_equal(total, expected)


@pytest.mark.parametrize("seed", range(4))
def test_clients_silent_in_the_first_trip_are_masked_out_by_the_survivors_seeds(seed: int) -> None:
    # Every client masked with its whole neighbourhood, the silent ones included:
    # nobody holds a silent client's key, so its partners' revealed seeds remove it.
    nodes = [3000 + 7 * i for i in range(10)]
    total, expected, survivors, _ = _round(
        10, degree=6, threshold=3, drop_at={"first": nodes[2:4]}, seed=seed
    )

    assert set(survivors) == set(nodes) - set(nodes[2:4])
    np.testing.assert_array_equal(total, expected)


def test_survivors_silent_at_unmask_leave_the_sum_exact_while_t_holders_answer() -> None:
    nodes = [3000 + 7 * i for i in range(10)]
    total, expected, survivors, _ = _round(
        10, degree=8, threshold=3, drop_at={"first": [nodes[0]], "unmask": nodes[5:7]}
    )

    assert nodes[5] in survivors and nodes[0] not in survivors
    np.testing.assert_array_equal(total, expected)


def test_a_client_left_with_too_few_holders_is_kept_out_of_the_sum() -> None:
    # k 4, t 3: with this seed's graph one client drew both silent clients as holders,
    # so its self mask could not be rebuilt: it is treated as dropped (its live holders
    # reveal its key share, never its self-mask share) and the sum stays exact.
    nodes = [3000 + 7 * i for i in range(10)]
    total, expected, survivors, server = _round(
        10, degree=4, threshold=3, drop_at={"first": nodes[1:3]}, seed=2
    )

    starved = {n for n in nodes if "fewer than 3 usable holders" in server.excluded.get(n, "")}
    assert len(starved) == 1 and not starved & set(survivors)
    assert len(survivors) == 7
    np.testing.assert_array_equal(total, expected)


def test_the_graph_is_symmetric_and_every_client_knows_its_neighbours() -> None:
    nodes = [3000 + 7 * i for i in range(9)]
    _, _, setups = _keyed(nodes, degree=3, threshold=2)

    for node, setup in setups.items():
        assert len(setup.holders) == 3 and node not in setup.holders
        for holder in setup.holders:
            assert node in setups[holder].drawn_by
        for sender in setup.drawn_by:
            assert node in setups[sender].holders


def test_a_device_whose_policy_refuses_a_server_graph_keeps_out() -> None:
    nodes = [3000, 3007, 3014]
    _, pending, setups = _keyed(nodes, degree=2, threshold=2)
    request = setups[3000]
    strict = replace(POLICY, accept_server_graph=False)

    with pytest.raises(PolicyViolation, match="does not let the server draw"):
        ClientSession(
            request.setup,
            policy=strict,
            rng=DeterministicRandom(1),
            prekey=pending[3000],
            holders=request.holders,
        )


def test_the_active_model_never_accepts_a_server_graph() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(5))
    with pytest.raises(ConfigError, match="semi-honest"):
        ProtocolPolicy(
            threat_model=ThreatModel.ACTIVE,
            authority_public_key=authority.public_key,
            accept_server_graph=True,
        )
    with pytest.raises(InvalidMessage, match="semi-honest"):
        ServerSession(
            [1, 2, 3],
            degree=2,
            threshold=2,
            encoding=ENCODING,
            vector_length=LENGTH,
            threat_model=ThreatModel.ACTIVE,
            rng=DeterministicRandom(0),
            authority_public_key=authority.public_key,
            server_graph=True,
        )


@pytest.mark.parametrize(
    "holders",
    [(3007,), (3007, 3007), (3000, 3007), (3007, 9999), (3014, 3007)],
    ids=["too-few", "repeated", "itself", "outsider", "unsorted"],
)
def test_holders_that_are_not_k_other_participants_are_refused(holders: tuple[int, ...]) -> None:
    nodes = [3000, 3007, 3014, 3021]
    _, pending, setups = _keyed(nodes, degree=2, threshold=2)
    request = setups[3000]

    with pytest.raises(InvalidMessage, match="not 2 other participants"):
        ClientSession(
            request.setup,
            policy=POLICY,
            rng=DeterministicRandom(1),
            prekey=pending[3000],
            holders=holders,
        )


def test_bundles_from_clients_that_did_not_draw_it_are_refused_at_unmask() -> None:
    nodes = [3000 + 7 * i for i in range(6)]
    _, pending, setups = _keyed(nodes, degree=2, threshold=2)
    request = setups[3000]
    client = ClientSession(
        request.setup,
        policy=POLICY,
        rng=DeterministicRandom(1),
        prekey=pending[3000],
        holders=request.holders,
    )
    client.share_and_mask(request.prekeys, request.drawn_by, rng_ints(0, 3000))
    stranger = next(n for n in nodes if n != 3000 and n not in request.drawn_by)

    with pytest.raises(InvalidMessage, match="did not draw this one"):
        client.unmask(UnmaskRequest(tuple(nodes), {}, {stranger: b"\x00" * 64}))


def test_a_server_that_shows_other_holders_than_it_drew_excludes_that_client() -> None:
    nodes = [3000 + 7 * i for i in range(6)]
    server, pending, setups = _keyed(nodes, degree=3, threshold=2)
    replies: dict[int, tuple[PrekeyedShares, object]] = {}
    for n, request in setups.items():
        holders = request.holders
        if n == 3000:  # a client that drew its own holders instead
            other = min(set(nodes) - {3000} - set(request.holders))
            holders = tuple(sorted({*request.holders[1:], other}))
        client = ClientSession(
            request.setup,
            policy=POLICY,
            rng=DeterministicRandom(n),
            prekey=pending[n],
            holders=holders,
        )
        replies[n] = client.share_and_mask(request.prekeys, request.drawn_by, rng_ints(0, n))

    server.receive_graph(replies)  # type: ignore[arg-type]

    assert "holders other than the server drew" in server.excluded[3000]


def test_an_unmask_below_the_threshold_of_live_holders_aborts() -> None:
    nodes = [3000 + 7 * i for i in range(6)]
    with pytest.raises(ProtocolAbort):
        _round(6, degree=2, threshold=2, drop_at={"unmask": nodes[:4]})
