"""Who took part in a training round: the clients that replied, or those inside a secure sum.

A plain round's participants are the nodes whose replies succeeded. A secure
round hands the strategy one aggregate reply; the secure Grid lists the
subjects inside its sum in a ConfigRecord under
:data:`fl_server.secagg_config.PARTICIPANTS_RECORD_KEY`, so any DP wrapper or
:class:`fl_server.spend.SpendSink` can charge them without a hook into the Grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from flwr.app import Message

from fedge.errors import ConfigError
from fl_server._dp_records import metrics_of, number
from fl_server.secagg_config import PARTICIPANTS_FIELD, PARTICIPANTS_RECORD_KEY

__all__ = [
    "MAX_SUBJECT_LENGTH",
    "SURVIVORS_METRIC",
    "RoundParticipants",
    "round_participants",
    "secure_participants",
]

MAX_SUBJECT_LENGTH: Final = 128
# The metric by which a secure round's aggregate reply says how many clients it sums.
SURVIVORS_METRIC: Final = "secagg-survivors"


def secure_participants(reply: Message) -> list[str] | None:
    """Return the subjects a secure round's aggregate reply says are inside its sum.

    Parameters
    ----------
    reply
        A train reply; the secure Grid's aggregate carries a ConfigRecord under
        ``PARTICIPANTS_RECORD_KEY`` whose ``PARTICIPANTS_FIELD`` lists them.

    Returns
    -------
    list[str] | None
        The subjects in the reply's order, or None if the reply has no such record
        (or is an error reply).

    Raises
    ------
    ConfigError
        If the field is not a non-empty list of distinct strings of 1 to
        ``MAX_SUBJECT_LENGTH`` characters.
    """
    if not reply.has_content():
        return None
    record = reply.content.config_records.get(PARTICIPANTS_RECORD_KEY)
    if record is None:
        return None
    listed = record.get(PARTICIPANTS_FIELD)
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        raise ConfigError(f"the participants record's {PARTICIPANTS_FIELD!r} must be a list of str")
    subjects = [s for s in listed if isinstance(s, str)]
    if not subjects:
        raise ConfigError("the participants record lists no subjects")
    for subject in subjects:
        if not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
            raise ConfigError(
                f"a participant subject must have 1 to {MAX_SUBJECT_LENGTH} characters, "
                f"got {len(subject)}"
            )
    if len(set(subjects)) != len(subjects):
        raise ConfigError("the participants record names a subject twice")
    return subjects


@dataclass(frozen=True, slots=True)
class RoundParticipants:
    """The clients inside a round's successful replies.

    ``secure`` says whether they came as one secure aggregate; ``subjects``
    names each (a node id as text in a plain round).
    """

    secure: bool
    subjects: list[str]

    @property
    def count(self) -> int:
        """How many clients the replies hold."""
        return len(self.subjects)


def round_participants(valid: Sequence[Message], *, secure_run: bool) -> RoundParticipants:
    """Return who is inside a round's successful train replies.

    Parameters
    ----------
    valid
        The round's replies without errors.
    secure_run
        The run aggregates securely: its replies must be one secure aggregate.

    Raises
    ------
    ConfigError
        If a secure run got plain replies, a plain run got an aggregate, a
        secure round gave more than one reply, or the aggregate does not list
        (exactly as many as it sums of) its participants.
    """
    marked = [r for r in valid if SURVIVORS_METRIC in metrics_of(r)]
    if not marked:
        if secure_run and valid:
            raise ConfigError(
                "a secure run got plain train replies: is the Grid a SecureAggregationGrid?"
            )
        return RoundParticipants(False, [str(r.metadata.src_node_id) for r in valid])
    if not secure_run:
        # A client cannot pass its own model off as a secure aggregate.
        raise ConfigError(f"a reply carries {SURVIVORS_METRIC!r} but the run is not secure")
    if len(valid) != 1:
        raise ConfigError(f"a secure round yields one aggregate reply, got {len(valid)}")
    subjects = secure_participants(valid[0])
    if subjects is None:
        # Never charge nobody: without the list the ledger would miss every participant.
        raise ConfigError(
            f"a secure aggregate reply carries no {PARTICIPANTS_RECORD_KEY!r} record: "
            "its participants cannot be charged"
        )
    survivors = number(metrics_of(valid[0]), SURVIVORS_METRIC)
    if survivors != len(subjects):
        raise ConfigError(
            f"the secure aggregate sums {survivors:g} clients but names {len(subjects)}"
        )
    return RoundParticipants(True, subjects)
