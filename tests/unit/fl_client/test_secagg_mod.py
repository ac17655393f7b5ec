"""The client mod: pass-through, refusal of bad or stale messages, no weights in its replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import SECAGG_ERROR_CODE, make_secagg_mod
from secure_agg import wire
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import RECORD_KEY, Envelope, Stage
from secure_agg.errors import InvalidMessage
from secure_agg.messages import KeyAdvertisement, ShareKeysRequest
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession

NODE = 7
POLICY = DevicePolicy(protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST))


def _message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=NODE,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=600.0,
        message_type=message_type,
    )
    message: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    return message


def _record(envelope: Envelope) -> ConfigRecord:
    return ConfigRecord({**envelope.to_fields()})


def _context() -> Context:
    return Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


def _train(msg: Message, context: Context) -> Message:
    del context
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    assert RECORD_KEY not in msg.content, "the train handler must not see the envelope"
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + np.float32(0.1))})
    metrics = MetricRecord({"num-examples": 12, "train-loss": 0.5})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def _session(length: int = 5) -> ServerSession:
    return ServerSession(
        [NODE, 8, 9],
        degree=2,
        threshold=2,
        encoding=EncodingConfig(clip_range=1.0, max_clients=3, weight_cap=100),
        vector_length=length,
        threat_model=ThreatModel.SEMI_HONEST,
        rng=DeterministicRandom(1),
    )


def _setup_message(server: ServerSession) -> Message:
    setup = server.setups()[NODE]
    envelope = Envelope(Stage.SETUP, server.round_id, wire.encode(setup))
    return _message(RecordDict({RECORD_KEY: _record(envelope)}))


def test_messages_without_the_envelope_pass_through() -> None:
    mod = make_secagg_mod(policy=POLICY)
    msg = _message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))})}))

    reply = mod(msg, _context(), _train)

    assert reply.content.array_records["arrays"]["w"].numpy()[0] == pytest.approx(0.1)


def _must_not_train(msg: Message, context: Context) -> Message:
    raise AssertionError("training belongs to the masked-input stage")


def test_setup_answers_with_a_key_advertisement_only_and_does_not_train() -> None:
    server = _session()
    context = _context()

    reply = make_secagg_mod(policy=POLICY, rng_factory=lambda: DeterministicRandom(2))(
        _setup_message(server), context, _must_not_train
    )

    assert not reply.has_error()
    assert list(reply.content.keys()) == [RECORD_KEY]
    envelope = Envelope.from_fields(reply.content.config_records[RECORD_KEY])
    advert = wire.decode(envelope.payload, KeyAdvertisement)
    assert advert.node_id == NODE
    assert "fedge.secagg.session" in context.state


def test_a_setup_for_another_round_id_is_refused() -> None:
    server = _session()
    message = _setup_message(server)
    record = message.content.config_records[RECORD_KEY]
    record["round-id"] = b"z" * 16

    reply = make_secagg_mod(policy=POLICY)(message, _context(), _must_not_train)

    assert reply.has_error() and reply.error.code == SECAGG_ERROR_CODE
    assert "differs from the envelope" in (reply.error.reason or "")


def test_a_stage_without_a_round_or_of_another_round_is_refused() -> None:
    server = _session()
    context = _context()
    mod = make_secagg_mod(policy=POLICY)
    request = wire.encode(ShareKeysRequest(()))

    def stage_message(round_id: bytes) -> Message:
        envelope = Envelope(Stage.SHARE_KEYS, round_id, request)
        return _message(RecordDict({RECORD_KEY: _record(envelope)}))

    orphan = mod(stage_message(server.round_id), context, _train)
    mod(_setup_message(server), context, _train)
    stale = mod(stage_message(b"x" * 16), context, _train)

    assert "without a round in progress" in (orphan.error.reason or "")
    assert "another round" in (stale.error.reason or "")
    assert "fedge.secagg.session" not in context.state, "a refused round forgets its secrets"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"stage": "setup", "round-id": b"r" * 16}, "has fields"),
        ({"stage": "launch", "round-id": b"r" * 16, "payload": b""}, "unknown"),
        ({"stage": "setup", "round-id": b"r", "payload": b""}, "round id"),
        ({"stage": 3, "round-id": b"r" * 16, "payload": b""}, "must be text"),
        ({"stage": "setup", "round-id": b"r" * 16, "payload": "text"}, "payload must be bytes"),
    ],
)
def test_malformed_envelopes_are_rejected(fields: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        Envelope.from_fields(fields)
