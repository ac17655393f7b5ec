"""The client side of fedge secure aggregation as a Flower mod (Message API).

Add it to any ClientApp (``ClientApp(mods=[make_secagg_mod()])``) whose train
handler returns one ArrayRecord (the local model) and one MetricRecord with the
example count. Train messages without the secure-aggregation envelope pass
through untouched; with it the mod runs the train handler once, then answers
the server's stages itself:

1. ``setup``: reply with this round's public keys (key advertisement);
2. ``share-keys``: reply with the sealed Shamir shares for the neighbours;
3. ``masked-input`` (arrives with the train message): train, compute the
   update (local - global), clip, quantise and weight it
   (:func:`secure_agg.encode`), reply with it masked at ring width — never
   with the weights;
4. ``consistency`` (active model), 5. ``unmask``.

Between messages the round's state lives in ``Context.state`` as bytes, so the
mod works when each message runs in a fresh process (Flower's simulation and
isolated ClientApps).

Notes
-----
The client's metrics (loss, exact example count) are not sent: they would
reveal per-client information the protocol hides. A failure at any stage is
answered with an error reply and the round's secrets are wiped.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedge.errors import ConfigError
from fl_client.dp_mod import SECURE_MARKER_KEY, secure_marker
from fl_client.updates import flat_update
from secure_agg import wire
from secure_agg.client import ClientSession
from secure_agg.encoding import encode
from secure_agg.envelope import RECORD_KEY, VECTOR_KEY, VECTOR_RECORD_KEY, Envelope, Stage
from secure_agg.errors import CryptoError, InvalidMessage, ProtocolAbort
from secure_agg.identity import NodeIdentity
from secure_agg.messages import (
    ConsistencyRequest,
    MaskedInputRequest,
    RoundSetup,
    ShareKeysRequest,
    UnmaskRequest,
)
from secure_agg.randomness import RandomSource, SystemRandomSource
from strategies.central import CDP_RECORD_KEY, UNCLIPPED_METRIC
from strategies.ddp import DDP_RECORD_KEY, DdpConfig, ddp_encode
from strategies.rotation import padded_length

__all__ = ["SECAGG_ERROR_CODE", "IdentityProvider", "make_secagg_mod"]

logger = logging.getLogger(__name__)

SECAGG_ERROR_CODE: Final = 4301
_STATE_KEY: Final = "fedge.secagg.session"


class IdentityProvider(Protocol):
    """Return this node's enrolment identity (needed in the active threat model)."""

    def __call__(self, context: Context) -> NodeIdentity | None:
        """Return the identity of the node running ``context``, or None if it has none."""
        ...


def _no_identity(context: Context) -> NodeIdentity | None:
    del context
    return None


def _only_arrays(content: RecordDict, what: str) -> ArrayRecord:
    if len(content.array_records) != 1:
        raise ConfigError(f"{what} must carry exactly one ArrayRecord")
    return next(iter(content.array_records.values()))


def _weight(reply: Message, weight_key: str, cap: int) -> int:
    metrics = reply.content.metric_records
    if len(metrics) != 1:
        raise ConfigError("the train handler must reply with exactly one MetricRecord")
    value = next(iter(metrics.values())).get(weight_key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise ConfigError(f"the train reply's {weight_key!r} must be a number >= 1")
    # A larger example count than the cap weighs as the cap: the ring must not wrap.
    return min(int(value), cap)


def _unclipped_bit(reply: Message) -> float | None:
    metrics = reply.content.metric_records
    if len(metrics) != 1:
        raise ConfigError("the train handler must reply with exactly one MetricRecord")
    value = next(iter(metrics.values())).get(UNCLIPPED_METRIC)
    if value is None:
        return None
    if value not in (0.0, 1.0):
        raise ConfigError(f"the clipped-update bit must be 0 or 1, got {value!r}")
    return float(value)


def _reply(
    msg: Message, envelope: Envelope, vector: npt.NDArray[np.uint32] | None = None
) -> Message:
    fields: dict[str, ConfigRecordValues] = {**envelope.to_fields()}
    content = RecordDict({RECORD_KEY: ConfigRecord(fields)})
    if vector is not None:
        content[VECTOR_RECORD_KEY] = ArrayRecord({VECTOR_KEY: Array(vector)})
    return Message(content=content, reply_to=msg)


def _clear(context: Context) -> None:
    if _STATE_KEY in context.state:
        del context.state[_STATE_KEY]


def _save(context: Context, session: ClientSession) -> None:
    context.state[_STATE_KEY] = ConfigRecord({"state": session.export_state()})


def make_secagg_mod(
    *,
    identities: IdentityProvider = _no_identity,
    rng_factory: Callable[[], RandomSource] = SystemRandomSource,
    weight_key: str = "num-examples",
) -> Mod:
    """Return a Flower mod that runs the client side of fedge secure aggregation.

    Parameters
    ----------
    identities
        Gives the node its enrolment identity (active threat model).
    rng_factory
        Source of keys, masks and stochastic rounding; the OS CSPRNG by default
        (tests inject seeded ones).
    weight_key
        The train reply's metric holding the example count (the FedAvg weight).
    """

    def _start(msg: Message, envelope: Envelope, context: Context) -> Message:
        setup = wire.decode(envelope.payload, RoundSetup)
        if setup.round_id != envelope.round_id:
            raise InvalidMessage("the setup's round id differs from the envelope's")
        session = ClientSession(setup, rng=rng_factory(), identity=identities(context))
        advert = session.advertise()
        _save(context, session)
        return _reply(msg, Envelope(Stage.SETUP, setup.round_id, wire.encode(advert)))

    def _train_and_mask(
        msg: Message,
        envelope: Envelope,
        context: Context,
        call_next: ClientAppCallable,
        session: ClientSession,
    ) -> Message | npt.NDArray[np.uint32]:
        # Train only now, once the keys are agreed: the state between messages
        # never holds the update, and a device failing in training counts as a
        # masked-input dropout, which the protocol recovers from.
        request = wire.decode(envelope.payload, MaskedInputRequest)
        ddp_fields = msg.content.config_records.get(DDP_RECORD_KEY)
        ddp = None if ddp_fields is None else DdpConfig.from_fields(ddp_fields)
        stripped = RecordDict({k: v for k, v in msg.content.items() if k != RECORD_KEY})
        # Tells the DP mod it runs inside a secure round (its clipped bit may be summed).
        stripped[SECURE_MARKER_KEY] = secure_marker()
        central = CDP_RECORD_KEY in msg.content.config_records
        train_msg = copy.copy(msg)
        train_msg.content = stripped
        reply = call_next(train_msg, context)
        if reply.has_error():
            return reply
        update = flat_update(
            _only_arrays(stripped, "the train message"),
            _only_arrays(reply.content, "the train reply"),
        )
        setup = session.setup
        if ddp is not None:
            # Distributed DP: clip, rotate, round and add this client's noise share
            # before masking; the unweighted sum the server unmasks is already private.
            if padded_length(update.shape[0]) != setup.vector_length:
                raise InvalidMessage("the model does not match the round's vector length")
            noisy = ddp_encode(update, ddp, rng_factory())
            return session.masked_input(request, noisy, consume=True).vector
        bit = _unclipped_bit(reply) if central else None
        if bit is not None:
            # Adaptive clipping: the bit is summed with the update, never seen alone.
            update = np.append(update, bit * setup.encoding.clip_range)
        if update.shape[0] + 1 != setup.vector_length:
            raise InvalidMessage(
                f"the model has {update.shape[0]} values, "
                f"the round expects {setup.vector_length - 1}"
            )
        weight = _weight(reply, weight_key, setup.encoding.weight_cap)
        encoded = encode(update, weight=weight, config=setup.encoding, rng=rng_factory())
        return session.masked_input(request, encoded, consume=True).vector

    def _continue(
        msg: Message, envelope: Envelope, context: Context, call_next: ClientAppCallable
    ) -> Message:
        record = context.state.config_records.get(_STATE_KEY)
        if record is None:
            raise InvalidMessage(f"{envelope.stage.value} without a round in progress")
        state = record["state"]
        assert isinstance(state, bytes)
        session = ClientSession.restore(state, rng=rng_factory(), identity=identities(context))
        if session.round_id != envelope.round_id:
            raise InvalidMessage("a message of another round (stale or replayed)")
        vector = None
        out: object = None
        if envelope.stage is Stage.SHARE_KEYS:
            out = session.share_keys(wire.decode(envelope.payload, ShareKeysRequest))
        elif envelope.stage is Stage.MASKED_INPUT:
            masked = _train_and_mask(msg, envelope, context, call_next, session)
            if isinstance(masked, Message):
                _clear(context)
                return masked
            vector = masked
        elif envelope.stage is Stage.CONSISTENCY:
            out = session.confirm(wire.decode(envelope.payload, ConsistencyRequest))
        elif envelope.stage is Stage.UNMASK:
            out = session.unmask(wire.decode(envelope.payload, UnmaskRequest))
        else:
            raise InvalidMessage(f"unexpected stage {envelope.stage.value}")
        if envelope.stage is Stage.UNMASK:
            _clear(context)
        else:
            _save(context, session)
        payload = b"" if vector is not None else wire.encode(out)
        return _reply(msg, Envelope(envelope.stage, envelope.round_id, payload), vector)

    def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY not in msg.content.config_records
        ):
            return call_next(msg, context)
        try:
            envelope = Envelope.from_fields(msg.content.config_records[RECORD_KEY])
            if envelope.stage is Stage.SETUP:
                _clear(context)
                return _start(msg, envelope, context)
            return _continue(msg, envelope, context, call_next)
        except (InvalidMessage, CryptoError, ProtocolAbort, ConfigError) as exc:
            _clear(context)
            logger.warning("secure aggregation: leaving the round: %s", exc)
            return Message(
                Error(code=SECAGG_ERROR_CODE, reason=f"secure aggregation: {exc}"), reply_to=msg
            )

    return secagg_mod
