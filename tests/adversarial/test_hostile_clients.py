"""Hostile clients and hostile fields: the round completes without the culprit, or is refused.

No party crashes or hangs: a client with corrupted, missing or oversized shares, an
oversized enrolment id or absurd DP parameters is dropped and named (the honest ones
carry on), and every stage's messages, mutated at random or filled with extreme values,
raise only fedge's own errors.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from fedge.errors import ConfigError, FedgeError
from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from secure_agg import wire
from secure_agg.client import ClientSession
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import RECORD_KEY, Envelope, Stage
from secure_agg.identity import EnrolmentAuthority
from secure_agg.messages import (
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvertisement,
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
from secure_agg.wire import Writer
from strategies.ddp import DDP_RECORD_KEY, DdpConfig
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    App,
    InProcessGrid,
    _server_identity,
)

NODES = list(range(501, 509))
AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(21))
IDENTITIES = {n: AUTHORITY.enrol(f"device-{n}", DeterministicRandom(n)) for n in NODES}
POLICY = DevicePolicy(
    protocol=ProtocolPolicy(
        threat_model=ThreatModel.ACTIVE, authority_public_key=AUTHORITY.public_key
    ),
    min_noise_multiplier=0.01,
)
CONFIG = SecAggConfig(
    clip_range=0.5,
    weight_cap=100,
    degree=6,
    threshold=5,
    threat_model=ThreatModel.ACTIVE,
    authority_public_key=AUTHORITY.public_key,
)


def _identity(context: Context) -> object:
    return IDENTITIES[context.node_id]


def _train(msg: Message, context: Context) -> Message:
    arrays = msg.content.array_records["arrays"]
    step = np.float32(0.01 * (context.node_id - 500))
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + step)})
    metrics = MetricRecord({"num-examples": 1})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def _honest() -> App:
    mod = make_secagg_mod(policy=POLICY, identities=_identity)  # type: ignore[arg-type]
    return lambda msg, context: mod(msg, context, _train)


def _tampering(stage: Stage, change: Callable[[bytes], bytes]) -> App:
    """An enrolled client that follows the protocol but rewrites its reply at one stage."""
    honest = _honest()

    def app(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        record = reply.content.config_records.get(RECORD_KEY) if reply.has_content() else None
        if record is not None:
            envelope = Envelope.from_fields(record)
            if envelope.stage is stage:
                changed = Envelope(stage, envelope.round_id, change(envelope.payload))
                reply.content[RECORD_KEY] = ConfigRecord({**changed.to_fields()})
        return reply

    return app


def _round(apps: dict[int, App]) -> tuple[ArrayRecord | None, SecAggRoundStats]:
    stats: list[SecAggRoundStats] = []
    grid = SecureAggregationGrid(InProcessGrid(apps), CONFIG, on_round=stats.append)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(apps))
    arrays = ArrayRecord({"w": Array(np.zeros(6, np.float32))})
    replies = list(grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
    aggregated, _ = strategy.aggregate_train(1, replies)
    return aggregated, stats[0]


def _mean_of(nodes: list[int]) -> float:
    return float(np.mean([0.01 * (n - 500) for n in nodes]))


def _shares_to_some(payload: bytes) -> bytes:
    shares = wire.decode(payload, EncryptedShares)
    kept = dict(list(shares.ciphertexts.items())[:-2])  # drops two of its holders
    return wire.encode(EncryptedShares(node_id=shares.node_id, ciphertexts=kept))


def _spoiled_bundles(payload: bytes) -> bytes:
    shares = wire.decode(payload, EncryptedShares)
    spoiled = {h: c[:-1] + bytes([c[-1] ^ 0x01]) for h, c in shares.ciphertexts.items()}
    return wire.encode(EncryptedShares(node_id=shares.node_id, ciphertexts=spoiled))


def _oversized_enrolment_id(payload: bytes) -> bytes:
    advert = wire.decode(payload, KeyAdvertisement)
    assert advert.certificate is not None
    huge = replace(advert.certificate, enrolment_id="x" * 65_536)
    writer = Writer()  # written by hand: fedge's own encoder refuses such a field
    writer.u8(2)
    writer.u8(1)
    writer.u64(advert.node_id)
    for key in (advert.enc_public, advert.mask_public, advert.self_mask_commitment):
        writer.fixed(key, 32)
    writer.ids(advert.holders)
    writer.fixed(advert.setup_digest, 32)
    writer.u8(1)
    raw = huge.enrolment_id.encode()
    writer.u32(len(raw))
    writer._parts.append(raw)
    writer.fixed(huge.public_key, 32)
    writer.fixed(huge.signature, 64)
    assert advert.signature is not None
    writer.fixed(advert.signature, 64)
    return writer.getvalue()


@pytest.mark.parametrize(
    ("stage", "change", "reason"),
    [
        (Stage.SHARE_KEYS, _shares_to_some, "no shares for live holders"),
        (Stage.SHARE_KEYS, _spoiled_bundles, "did not open at node"),
        (Stage.SETUP, _oversized_enrolment_id, "malformed reply"),
    ],
    ids=["shares-to-some-holders", "spoiled-bundles", "oversized-enrolment-id"],
)
def test_a_hostile_client_is_dropped_and_named_and_the_others_carry_on(
    stage: Stage, change: Callable[[bytes], bytes], reason: str
) -> None:
    culprit = NODES[3]
    apps = {n: _honest() for n in NODES}
    apps[culprit] = _tampering(stage, change)

    aggregated, stats = _round(apps)

    assert aggregated is not None, stats.aborted
    others = [n for n in NODES if n != culprit]
    assert stats.survivor_ids == others
    assert reason in stats.failures[culprit]
    bound = EncodingConfig(clip_range=0.5, max_clients=8, weight_cap=100).error_bound
    np.testing.assert_allclose(aggregated["w"].numpy(), _mean_of(others), atol=bound)


# ---------------------------------------------------------------- hostile fields, client side


def _setup_bytes(**fields: object) -> bytes:
    """A RoundSetup written field by field, whatever the values (the encoder would refuse)."""
    values: dict[str, object] = {
        "round_id": b"r" * 16,
        "node_id": 1,
        "participants": (1, 2, 3, 4, 5),
        "degree": 4,
        "threshold": 3,
        "clip": 0.5,
        "bits": 32,
        "max_clients": 5,
        "cap": 1,
        "length": 8,
        "threat": b"semi-honest",
    }
    values.update(fields)
    w = Writer()
    w.u8(1)
    w.u8(1)
    w.blob(values["round_id"])  # type: ignore[arg-type]
    w.u64(values["node_id"])  # type: ignore[arg-type]
    w.ids(values["participants"])  # type: ignore[arg-type]
    w.u32(values["degree"])  # type: ignore[arg-type]
    w.u32(values["threshold"])  # type: ignore[arg-type]
    w.f64(values["clip"])  # type: ignore[arg-type]
    w.u8(values["bits"])  # type: ignore[arg-type]
    w.u32(values["max_clients"])  # type: ignore[arg-type]
    w.u32(values["cap"])  # type: ignore[arg-type]
    w.u64(values["length"])  # type: ignore[arg-type]
    w.blob(values["threat"])  # type: ignore[arg-type]
    return w.getvalue()


SEMI = ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, corrupt_fraction=0.0, min_degree=1)


@pytest.mark.parametrize(
    "fields",
    [
        {"clip": 5e-324},  # subnormal
        {"clip": 1e308},
        {"clip": math.inf},
        {"clip": math.nan},
        {"clip": 0.0},
        {"clip": -1.0},
        {"bits": 0},
        {"bits": 65},
        {"bits": 255},
        {"max_clients": 0},
        {"max_clients": 2**32 - 1},
        {"cap": 0},
        {"cap": 2**32 - 1},
        {"length": 0},
        {"length": 1},
        {"length": 2**31 + 1},
        {"length": 2**64 - 1},
        {"degree": 0},
        {"degree": 2**32 - 1},
        {"threshold": 0},
        {"threshold": 2**32 - 1},
        {"participants": ()},
        {"participants": (1,)},
        {"participants": (2, 3, 4)},  # without the recipient
        {"participants": tuple(range(1, 1 << 17))},  # 131,071 participants: over the policy
        {"node_id": 2**64 - 1},
        {"round_id": b""},
        {"round_id": b"r" * 65},
        {"threat": b"malicious"},
        {"threat": b"\xff\xfe"},
    ],
)
def test_extreme_setup_fields_raise_only_fedge_errors(fields: dict[str, object]) -> None:
    data = _setup_bytes(**fields)
    started = time.perf_counter()
    try:
        setup = wire.decode(data, RoundSetup)
        ClientSession(setup, policy=SEMI, rng=DeterministicRandom(1))
    except FedgeError:
        pass
    assert time.perf_counter() - started < 5.0


def _truncated_counts(kind: type[object]) -> bytes:
    version = wire.encode(ShareKeysRequest(()))[1]  # the protocol's current version byte
    header = bytes([{ShareKeysRequest: 3, MaskedInputRequest: 5, UnmaskRequest: 8}[kind], version])
    return header + struct.pack(">I", 0xFFFFFFFF)


@pytest.mark.parametrize("kind", [ShareKeysRequest, MaskedInputRequest, UnmaskRequest])
def test_huge_counts_are_refused_before_any_allocation(kind: type[object]) -> None:
    with pytest.raises(FedgeError, match="exceed the limit"):
        wire.decode(_truncated_counts(kind), kind)


# ---------------------------------------------------------------- random mutations, every stage


def _mutations(data: bytes, rng: DeterministicRandom, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        choice = rng.random_bytes(1)[0] % 4
        blob = bytearray(data)
        if choice == 0 and blob:  # flip bytes
            for _ in range(1 + rng.random_bytes(1)[0] % 4):
                position = int.from_bytes(rng.random_bytes(4), "big") % len(blob)
                blob[position] ^= 1 + rng.random_bytes(1)[0] % 255
        elif choice == 1:  # truncate
            blob = blob[: int.from_bytes(rng.random_bytes(4), "big") % (len(blob) + 1)]
        elif choice == 2:  # extend
            blob += rng.random_bytes(1 + rng.random_bytes(1)[0] % 64)
        else:  # overwrite a 4-byte field with an extreme value
            if len(blob) >= 4:
                position = int.from_bytes(rng.random_bytes(4), "big") % (len(blob) - 3)
                blob[position : position + 4] = rng.random_bytes(1) * 4
        out.append(bytes(blob))
    return out


def _fresh_round() -> tuple[ServerSession, dict[int, RoundSetup], dict[int, ClientSession]]:
    """A semi-honest round of five clients in memory, at its start."""
    nodes = [1, 2, 3, 4, 5]
    encoding = EncodingConfig(clip_range=0.5, ring_bits=32, max_clients=5, weight_cap=1)
    server = ServerSession(
        nodes,
        degree=4,
        threshold=3,
        encoding=encoding,
        vector_length=8,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=DeterministicRandom(3),
    )
    setups = server.setups()
    clients = {
        n: ClientSession(s, policy=SEMI, rng=DeterministicRandom(n)) for n, s in setups.items()
    }
    return server, setups, clients


def _honest_round_messages() -> dict[str, tuple[bytes, type[object]]]:
    """One honest (semi-honest) round in memory: a real example of every stage's message."""
    server, setups, clients = _fresh_round()
    adverts = {n: c.advertise() for n, c in clients.items()}
    share_requests = server.receive_adverts(adverts)
    shares = {n: clients[n].share_keys(r) for n, r in share_requests.items()}
    masked_requests = server.receive_shares(shares)
    masked = {
        n: clients[n].masked_input(r, np.zeros(8, np.uint32)) for n, r in masked_requests.items()
    }
    unmask = server.receive_masked(masked)
    responses = {n: clients[n].unmask(r) for n, r in unmask.items()}  # type: ignore[arg-type]
    return {
        "setup": (wire.encode(setups[1]), RoundSetup),
        "advert": (wire.encode(adverts[1]), KeyAdvertisement),
        "share-keys": (wire.encode(share_requests[1]), ShareKeysRequest),
        "shares": (wire.encode(shares[1]), EncryptedShares),
        "masked-request": (wire.encode(masked_requests[1]), MaskedInputRequest),
        "report": (wire.encode(MaskedInputReport(node_id=1, rejected=(2,))), MaskedInputReport),
        "consistency": (wire.encode(ConsistencyRequest((1, 2, 3))), ConsistencyRequest),
        "unmask": (wire.encode(unmask[1]), UnmaskRequest),
        "response": (wire.encode(responses[1]), UnmaskResponse),
    }


@pytest.mark.parametrize("stage", list(_honest_round_messages()))
def test_mutated_messages_of_every_stage_raise_only_fedge_errors(stage: str) -> None:
    data, kind = _honest_round_messages()[stage]
    rng = DeterministicRandom(int.from_bytes(stage.encode()[:8], "big"))
    decoded_count = 0
    for mutated in _mutations(data, rng, 300):
        try:
            decoded = wire.decode(mutated, kind)
        except FedgeError:
            continue
        decoded_count += 1
        # What decodes goes on to a party: a fresh honest round fed the mutated message.
        _feed(stage, decoded)
    assert decoded_count > 0, "no mutation got past the decoder: the parties were never tried"


def _feed(stage: str, message: object) -> None:
    """Hand ``message`` to the party that receives it in a fresh round; only FedgeError."""
    server, _, clients = _fresh_round()
    try:
        if stage == "setup":
            assert isinstance(message, RoundSetup)
            ClientSession(message, policy=SEMI, rng=DeterministicRandom(9)).advertise()
            return
        adverts = {n: c.advertise() for n, c in clients.items()}
        if stage == "advert":
            assert isinstance(message, KeyAdvertisement)
            server.receive_adverts({**adverts, 1: message})
            return
        share_requests = server.receive_adverts(adverts)
        if stage == "share-keys":
            assert isinstance(message, ShareKeysRequest)
            clients[1].share_keys(message)
            return
        shares = {n: clients[n].share_keys(r) for n, r in share_requests.items()}
        if stage == "shares":
            assert isinstance(message, EncryptedShares)
            server.receive_shares({**shares, 1: message})
            return
        masked_requests = server.receive_shares(shares)
        if stage == "masked-request":
            assert isinstance(message, MaskedInputRequest)
            clients[1].masked_input(message, np.zeros(8, np.uint32))
            return
        masked = {
            n: clients[n].masked_input(r, np.zeros(8, np.uint32))
            for n, r in masked_requests.items()
        }
        if stage == "report":
            assert isinstance(message, MaskedInputReport)
            masked[1] = replace(masked[1], rejected=message.rejected)
            server.receive_masked(masked)
            return
        unmask = server.receive_masked(masked)
        if isinstance(message, ConsistencyRequest):
            clients[1].unmask(UnmaskRequest(message.survivors, {}))
            return
        if isinstance(message, UnmaskRequest):
            clients[1].unmask(message)
            return
        responses = {n: clients[n].unmask(r) for n, r in unmask.items()}  # type: ignore[arg-type]
        assert isinstance(message, UnmaskResponse)
        server.finish({**responses, 1: message})
    except FedgeError:
        return


# ---------------------------------------------------------------- absurd DP fields at the device


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise-std", 1e-300),
        ("noise-std", 5e-324),
        ("noise-std", math.nan),
        ("l2-clip", math.inf),
        ("dimension", 0),
        ("dimension", 2**62),
        ("expected-clients", 0),
        ("expected-clients", 2**40),
        ("ring-bits", 12),
    ],
)
def test_absurd_distributed_dp_fields_are_refused_at_once(field: str, value: object) -> None:
    fields: dict[str, object] = {
        "l2-clip": 1.0,
        "noise-std": 0.5,
        "dimension": 6,
        "expected-clients": 8,
        "ring-bits": 32,
        "rotation-seed": bytes(32),
    }
    fields[field] = value
    mods = {n: make_secagg_mod(policy=POLICY, identities=_identity) for n in NODES}  # type: ignore[arg-type]

    def ddp_app(node: int) -> App:
        def app(msg: Message, context: Context) -> Message:
            if Envelope.from_fields(msg.content.config_records[RECORD_KEY]).stage is (
                Stage.MASKED_INPUT
            ):
                content = RecordDict(dict(msg.content))
                content[DDP_RECORD_KEY] = ConfigRecord(fields)  # type: ignore[arg-type]
                msg.content = content
            return mods[node](msg, context, _train)

        return app

    started = time.perf_counter()
    aggregated, stats = _round({n: ddp_app(n) for n in NODES})

    assert time.perf_counter() - started < 30.0
    assert aggregated is None and stats.aborted is not None
    assert all(
        reason.startswith("masked-input: secure aggregation:") for reason in stats.failures.values()
    )
    # Refused by the record's own validation (not, say, by a length mismatch later).
    with pytest.raises(ConfigError, match=r"distributed-DP|must be|noise|ring|dimension|clients"):
        DdpConfig.from_fields(fields)
