"""Who a round charges: the subjects a secure aggregate lists, checked before anyone is charged."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedge.errors import ConfigError
from fl_server.participants import (
    MAX_SUBJECT_LENGTH,
    SURVIVORS_METRIC,
    round_participants,
    secure_participants,
)
from fl_server.secagg_config import PARTICIPANTS_FIELD, PARTICIPANTS_RECORD_KEY


def _metadata(src: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{src}",
        src_node_id=src,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )


def _reply(src: int = 7, records: dict[str, ConfigRecord | MetricRecord] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1}), **(records or {})})
    reply: Message = Message(metadata=_metadata(src), content=content)  # type: ignore[call-overload]
    return reply


def _listing(subjects: object) -> Message:
    record = ConfigRecord({PARTICIPANTS_FIELD: subjects})  # type: ignore[dict-item]
    return _reply(records={PARTICIPANTS_RECORD_KEY: record})


def test_the_listed_subjects_are_returned_in_order() -> None:
    assert secure_participants(_listing(["device-b", "17", "device-a"])) == [
        "device-b",
        "17",
        "device-a",
    ]
    assert secure_participants(_listing(["x" * MAX_SUBJECT_LENGTH])) == ["x" * 128]


def test_a_reply_without_the_record_lists_nobody() -> None:
    assert secure_participants(_reply()) is None
    failed = Message(metadata=_metadata(3), error=Error(code=1, reason="gone"))  # type: ignore[call-overload]
    assert secure_participants(failed) is None


@pytest.mark.parametrize(
    ("subjects", "match"),
    [
        ("device-a", "^the participants record's 'subjects' must be a list of str$"),
        ([1, 2], "^the participants record's 'subjects' must be a list of str$"),
        ([], "^the participants record lists no subjects$"),
        (["a", ""], "^a participant subject must have 1 to 128 characters, got 0$"),
        (["x" * 129], "^a participant subject must have 1 to 128 characters, got 129$"),
        (["a", "b", "a"], "^the participants record names a subject twice$"),
    ],
)
def test_a_malformed_list_is_refused(subjects: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        secure_participants(_listing(subjects))


def test_a_plain_round_charges_the_nodes_that_replied() -> None:
    who = round_participants([_reply(11), _reply(12)], secure_run=False)

    assert not who.secure and who.subjects == ["11", "12"] and who.count == 2
    assert round_participants([], secure_run=True).count == 0


def test_a_secure_round_charges_the_listed_subjects() -> None:
    listed = ConfigRecord({PARTICIPANTS_FIELD: ["a", "b"]})
    metrics = MetricRecord({"num-examples": 2, SURVIVORS_METRIC: 2})
    reply = _reply(records={"metrics": metrics, PARTICIPANTS_RECORD_KEY: listed})

    who = round_participants([reply], secure_run=True)

    assert who.secure and who.subjects == ["a", "b"] and who.count == 2
