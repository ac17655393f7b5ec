"""The client side of fedge secure aggregation as a Flower mod (Message API).

Add it to any ClientApp (``ClientApp(mods=[make_secagg_mod(policy=...)])``) whose train
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

With keys announced in advance (``prekey`` and ``prekeyed-setup``), the last reply of
a round carries the public keys of this device's next participation (their private
halves stay in ``Context.state``), and a round then starts with the setup and every
participant's pre-key: the device checks its holders' pre-keys against its policy
and answers with its advertisement and sealed shares at once (1 and 2 in one
trip). Its pending key is consumed the moment a round names it, whatever follows.
On a graph the server drew (``keyed-masked-input``, semi-honest policies with
``accept_server_graph`` only) the train message comes with that setup and the
holders drawn for the device: it trains and answers with keys, shares and its
masked update at once (1 to 3 in one trip), and gets its bundles with ``unmask``.

Between messages the round's state lives in ``Context.state`` as bytes, so the
mod works when each message runs in a fresh process (Flower's simulation and
isolated ClientApps).

Notes
-----
The device trusts nothing the server says: every round is checked against the
device's own :class:`fl_client.policy.DevicePolicy` (given to the mod, never
read from a message) before a key is generated, and again before any share is
revealed; a distributed-DP round must also fit the policy's DP bounds, and the
device then reveals nothing unless the survivors hold the policy's fewest
honest contributors. In the active model a neighbour whose certificate has
expired on the device's own clock (``clock``), or whose enrolment id is on the
device's own verified revocation list (``revocations``), is refused exactly
like a forged one, before any share is sent. The client's metrics (loss, exact
example count) are not sent: they would reveal per-client information the protocol hides. A failure
or refusal at any stage is answered with an error reply, the round's secrets
are wiped, and the reason is recorded (``on_refusal``).
"""

from __future__ import annotations

import copy
import logging
import time
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

from fedge.errors import ConfigError, FedgeError
from fl_client.dp_mod import SECURE_MARKER_KEY, secure_marker
from fl_client.grad_sum import gradient_sum_of
from fl_client.mod_order import ModRank, ranked
from fl_client.policy import DevicePolicy
from fl_client.refusals import RefusalRecorder, ignore_refusal
from fl_client.revocations import RevocationProvider, nothing_revoked
from fl_client.updates import flat_update
from secure_agg import wire
from secure_agg.client import ClientSession
from secure_agg.encoding import encode
from secure_agg.envelope import (
    PREKEY_FIELD,
    PREKEY_RECORD_KEY,
    RECORD_KEY,
    VECTOR_KEY,
    VECTOR_RECORD_KEY,
    Envelope,
    Stage,
)
from secure_agg.errors import InvalidMessage, PolicyViolation
from secure_agg.identity import NodeIdentity
from secure_agg.messages import (
    ConsistencyRequest,
    EncryptedShares,
    GraphSetup,
    MaskedInput,
    MaskedInputReport,
    MaskedInputRequest,
    PrekeyedSetup,
    PreKeyRequest,
    RoundSetup,
    ShareKeysRequest,
    UnmaskRequest,
)
from secure_agg.params import ThreatModel
from secure_agg.prekeys import PendingPreKey
from secure_agg.randomness import RandomSource, SystemRandomSource
from strategies.central import CDP_RECORD_KEY, UNCLIPPED_METRIC, CentralDpRound, secure_l2_bound
from strategies.clipping import clip_l2
from strategies.ddp import DDP_RECORD_KEY, DdpConfig, ddp_encode
from strategies.rotation import rotated_length
from strategies.sample_ddp import SDDP_RECORD_KEY, SampleDdpConfig, sddp_encode

__all__ = ["SECAGG_ERROR_CODE", "IdentityProvider", "make_secagg_mod"]

logger = logging.getLogger(__name__)

SECAGG_ERROR_CODE: Final = 4301
_STATE_KEY: Final = "fedge.secagg.session"
_PREKEY_STATE_KEY: Final = "fedge.secagg.prekey"


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
    msg: Message, envelope: Envelope, vector: npt.NDArray[np.unsignedinteger] | None = None
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


def _take_pending(context: Context) -> PendingPreKey | None:
    """Remove and return the device's pending pre-key (a damaged one is dropped, never used)."""
    record = context.state.config_records.get(_PREKEY_STATE_KEY)
    if record is None:
        return None
    del context.state[_PREKEY_STATE_KEY]
    raw = record.get("state")
    if not isinstance(raw, bytes):
        return None
    try:
        return PendingPreKey.from_bytes(raw)
    except InvalidMessage:
        return None


def make_secagg_mod(
    *,
    policy: DevicePolicy,
    identities: IdentityProvider = _no_identity,
    rng_factory: Callable[[], RandomSource] = SystemRandomSource,
    weight_key: str = "num-examples",
    on_refusal: RefusalRecorder = ignore_refusal,
    revocations: RevocationProvider = nothing_revoked,
    clock: Callable[[], float] = time.time,
) -> Mod:
    """Return a Flower mod that runs the client side of fedge secure aggregation.

    Parameters
    ----------
    policy
        The device's own policy (required: no default trusts the server).
    identities
        Gives the node its enrolment identity (active threat model).
    rng_factory
        Source of keys, masks and stochastic rounding; the OS CSPRNG by default
        (tests inject seeded ones).
    weight_key
        The train reply's metric holding the example count (the FedAvg weight).
    on_refusal
        Told the stage and reason of every round the device leaves or refuses.
    revocations
        The enrolment ids the device treats as revoked: its own verified list
        (a :class:`fl_client.revocations.RevocationStore`), never the server's word.
    clock
        The device's own clock in Unix seconds, against which neighbours'
        certificate expiries are checked (a server's time is never used).

    Raises
    ------
    ConfigError
        If the policy allows no secure aggregation.
    """
    protocol = policy.secure_protocol()

    def _start(msg: Message, envelope: Envelope, context: Context) -> Message:
        setup = wire.decode(envelope.payload, RoundSetup)
        if setup.round_id != envelope.round_id:
            raise InvalidMessage("the setup's round id differs from the envelope's")
        session = ClientSession(
            setup, policy=protocol, rng=rng_factory(), identity=identities(context)
        )
        advert = session.advertise()
        _save(context, session)
        return _reply(msg, Envelope(Stage.SETUP, setup.round_id, wire.encode(advert)))

    def _announce(context: Context) -> bytes:
        """Make this device's next pre-key, keep its private half, return the public one."""
        pending = PendingPreKey.generate(context.node_id, rng_factory(), now=int(clock()))
        context.state[_PREKEY_STATE_KEY] = ConfigRecord({"state": pending.to_bytes()})
        return wire.encode(pending.announce(identities(context)))

    def _prekey(msg: Message, envelope: Envelope, context: Context) -> Message:
        request = wire.decode(envelope.payload, PreKeyRequest)
        if request.node_id != context.node_id:
            raise InvalidMessage("a pre-key request for another node")
        if not protocol.accept_prekeys:
            raise PolicyViolation("the device's policy takes no part in rounds keyed in advance")
        # A fresh key replaces any pending one (deleted: the server may have lost it).
        return _reply(msg, Envelope(Stage.PREKEY, envelope.round_id, _announce(context)))

    def _keyed_session(
        setup: RoundSetup,
        envelope: Envelope,
        pending: PendingPreKey | None,
        context: Context,
        *,
        holders: tuple[int, ...] | None = None,
    ) -> ClientSession:
        """Open a round keyed in advance with the pending key, once the policy allows it."""
        if setup.round_id != envelope.round_id:
            raise InvalidMessage("the setup's round id differs from the envelope's")
        if not protocol.accept_prekeys:
            raise PolicyViolation("the device's policy takes no part in rounds keyed in advance")
        if pending is None:
            raise InvalidMessage("a round keyed in advance, but this device holds no pre-key")
        now = int(clock())
        if not 0 <= now - pending.created_at <= protocol.prekey_max_age_s:
            raise PolicyViolation(
                f"the pending pre-key is older than the policy's {protocol.prekey_max_age_s} s "
                "(discarded)"
            )
        return ClientSession(
            setup,
            policy=protocol,
            rng=rng_factory(),
            identity=identities(context),
            prekey=pending,
            holders=holders,
        )

    def _start_prekeyed(msg: Message, envelope: Envelope, context: Context) -> Message:
        # Consumed before anything is checked: a key named in a round is never used again.
        pending = _take_pending(context)
        request = wire.decode(envelope.payload, PrekeyedSetup)
        setup = request.setup
        session = _keyed_session(setup, envelope, pending, context)
        if protocol.threat_model is ThreatModel.ACTIVE:
            now = int(clock())
            out = session.share_prekeyed(request.prekeys, now=now, revoked=revocations(context))
        else:
            out = session.share_prekeyed(request.prekeys)
        _save(context, session)
        return _reply(msg, Envelope(Stage.PREKEYED, setup.round_id, wire.encode(out)))

    def _encode_central(
        update: npt.NDArray[np.float64],
        reply: Message,
        central: CentralDpRound,
        session: ClientSession,
    ) -> npt.NDArray[np.unsignedinteger]:
        setup = session.setup
        encoding = setup.encoding
        dimension = update.shape[0]
        # Clipped again here: the DP mod's clipped update went through float32 weights,
        # whose rounding can leave it a hair above C, past conditional rounding's bound.
        update = clip_l2(update, central.l2_clip).update
        bit = _unclipped_bit(reply)
        if central.adaptive:
            if bit is None:
                raise ConfigError("adaptive clipping needs the DP mod's clipped-update bit")
            # The centred bit b - 1/2, scaled to +-C: an exact ring level (no rounding),
            # summed with the update and never seen alone (Andrew et al. 2021).
            update = np.append(update, (2 * bit - 1) * encoding.clip_range)
        if update.shape[0] + 1 != setup.vector_length:
            raise InvalidMessage(
                f"the model has {dimension} values, the round expects another length"
            )
        # Conditional rounding keeps the rounded update within the bound the server's
        # noise is calibrated to (the rounding error inside the accounted sensitivity).
        bound = secure_l2_bound(central.l2_clip, dimension, encoding)
        return encode(
            update,
            weight=1,
            config=encoding,
            rng=rng_factory(),
            l2_bound=bound,
            bounded_length=dimension,
        )

    def _train_and_mask(
        msg: Message,
        envelope: Envelope,
        context: Context,
        call_next: ClientAppCallable,
        session: ClientSession,
    ) -> Message | tuple[npt.NDArray[np.unsignedinteger], MaskedInputReport]:
        # Train only now, once the keys are agreed: the state between messages
        # never holds the update, and a device failing in training counts as a
        # masked-input dropout, which the protocol recovers from.
        request = wire.decode(envelope.payload, MaskedInputRequest)
        encoded = _train_and_encode(msg, context, call_next, session)
        if isinstance(encoded, Message):
            return encoded
        masked = _mask(session, request, encoded, context)
        return masked.vector, MaskedInputReport(node_id=masked.node_id, rejected=masked.rejected)

    def _train_and_encode(
        msg: Message, context: Context, call_next: ClientAppCallable, session: ClientSession
    ) -> Message | npt.NDArray[np.unsignedinteger]:
        """Check the round's DP terms, train, and encode the update for the ring (or decline)."""
        records = msg.content.config_records
        ddp = (
            None
            if DDP_RECORD_KEY not in records
            else DdpConfig.from_fields(records[DDP_RECORD_KEY])
        )
        central = (
            None
            if CDP_RECORD_KEY not in records
            else CentralDpRound.from_fields(records[CDP_RECORD_KEY])
        )
        sddp = (
            None
            if SDDP_RECORD_KEY not in records
            else SampleDdpConfig.from_fields(records[SDDP_RECORD_KEY])
        )
        setup = session.setup
        if ddp is not None and sddp is not None:
            raise InvalidMessage("a round cannot run two distributed-DP mechanisms at once")
        if ddp is not None:
            # Before training: a round outside the policy costs nothing.
            policy.check_distributed(ddp)
            if rotated_length(ddp.dimension) != setup.vector_length:
                raise InvalidMessage("the distributed-DP dimension does not match the round")
            session.require_survivors(policy.required_survivors(len(setup.participants)))
        if sddp is not None:
            policy.check_sample_distributed(sddp)
            if rotated_length(sddp.dimension) != setup.vector_length:
                raise InvalidMessage("the shared-noise DP-SGD dimension does not match the round")
            session.require_survivors(policy.required_survivors(len(setup.participants)))
        stripped = RecordDict({k: v for k, v in msg.content.items() if k != RECORD_KEY})
        # Tells the DP mod it runs inside a secure round (its clipped bit may be summed).
        stripped[SECURE_MARKER_KEY] = secure_marker()
        train_msg = copy.copy(msg)
        train_msg.content = stripped
        reply = call_next(train_msg, context)
        if reply.has_error():
            return reply
        if sddp is not None:
            # The clipped gradient sum, in float64 from the train handler: scaled, rounded
            # and given this device's noise share before masking.
            gradients = gradient_sum_of(reply.content, sddp.dimension)
            return sddp_encode(gradients, sddp, rng_factory())
        update = flat_update(
            _only_arrays(stripped, "the train message"),
            _only_arrays(reply.content, "the train reply"),
        )
        if ddp is not None:
            # Distributed DP: clip, rotate, round and add this client's noise share
            # before masking; the unweighted sum the server unmasks is already private.
            encoded = ddp_encode(update, ddp, rng_factory())
        elif central is not None:
            encoded = _encode_central(update, reply, central, session)
        else:
            if update.shape[0] + 1 != setup.vector_length:
                raise InvalidMessage(
                    f"the model has {update.shape[0]} values, "
                    f"the round expects {setup.vector_length - 1}"
                )
            weight = _weight(reply, weight_key, setup.encoding.weight_cap)
            # The update is this call's own: its memory holds the levels.
            encoded = encode(
                update, weight=weight, config=setup.encoding, rng=rng_factory(), consume=True
            )
        return encoded

    def _mask(
        session: ClientSession,
        request: MaskedInputRequest,
        encoded: npt.NDArray[np.unsignedinteger],
        context: Context,
    ) -> MaskedInput:
        if protocol.threat_model is not ThreatModel.ACTIVE:
            return session.masked_input(request, encoded, consume=True)
        # A round keyed in advance checks its neighbours' advertisements here.
        return session.masked_input(
            request, encoded, consume=True, now=int(clock()), revoked=revocations(context)
        )

    def _start_on_server_graph(
        msg: Message, envelope: Envelope, context: Context, call_next: ClientAppCallable
    ) -> Message:
        # Consumed before anything is checked: a key named in a round is never used again.
        pending = _take_pending(context)
        request = wire.decode(envelope.payload, GraphSetup)
        setup = request.setup
        session = _keyed_session(setup, envelope, pending, context, holders=request.holders)
        encoded = _train_and_encode(msg, context, call_next, session)
        if isinstance(encoded, Message):
            # Training (or an inner mod: the budget, DP) declined: leave the round.
            on_refusal(context, "secure-aggregation keyed-masked-input", encoded.error.reason or "")
            return encoded
        shares, masked = session.share_and_mask(
            request.prekeys, request.drawn_by, encoded, consume=True
        )
        _save(context, session)
        return _reply(
            msg,
            Envelope(Stage.KEYED_MASKED_INPUT, setup.round_id, wire.encode(shares)),
            masked.vector,
        )

    def _share_keys(
        envelope: Envelope, context: Context, session: ClientSession
    ) -> EncryptedShares:
        request = wire.decode(envelope.payload, ShareKeysRequest)
        if protocol.threat_model is not ThreatModel.ACTIVE:
            return session.share_keys(request)
        # The device's own clock and revocation list, read as the certificates arrive.
        return session.share_keys(request, now=int(clock()), revoked=revocations(context))

    def _continue(
        msg: Message, envelope: Envelope, context: Context, call_next: ClientAppCallable
    ) -> Message:
        record = context.state.config_records.get(_STATE_KEY)
        if record is None:
            raise InvalidMessage(f"{envelope.stage.value} without a round in progress")
        state = record["state"]
        if not isinstance(state, bytes):
            raise InvalidMessage("the saved round state is damaged")
        session = ClientSession.restore(
            state, policy=protocol, rng=rng_factory(), identity=identities(context)
        )
        if session.round_id != envelope.round_id:
            raise InvalidMessage("a message of another round (stale or replayed)")
        vector = None
        out: object = None
        if envelope.stage is Stage.SHARE_KEYS:
            out = _share_keys(envelope, context, session)
        elif envelope.stage is Stage.MASKED_INPUT:
            masked = _train_and_mask(msg, envelope, context, call_next, session)
            if isinstance(masked, Message):
                # Training (or an inner mod: the budget, DP) declined: leave the round.
                _clear(context)
                on_refusal(context, "secure-aggregation masked-input", masked.error.reason or "")
                return masked
            vector, out = masked
        elif envelope.stage is Stage.CONSISTENCY:
            out = session.confirm(wire.decode(envelope.payload, ConsistencyRequest))
        elif envelope.stage is Stage.UNMASK:
            out = session.unmask(wire.decode(envelope.payload, UnmaskRequest))
        else:
            raise InvalidMessage(f"unexpected stage {envelope.stage.value}")
        payload = wire.encode(out)
        reply = _reply(msg, Envelope(envelope.stage, envelope.round_id, payload), vector)
        if envelope.stage is Stage.UNMASK:
            _clear(context)
            if protocol.accept_prekeys:
                # The keys of the next participation ride on this round's last reply.
                reply.content[PREKEY_RECORD_KEY] = ConfigRecord({PREKEY_FIELD: _announce(context)})
        else:
            _save(context, session)
        return reply

    def _refuse(msg: Message, context: Context, stage: str, reason: str) -> Message:
        _clear(context)
        logger.warning("secure aggregation: leaving the round at %s: %s", stage, reason)
        on_refusal(context, f"secure-aggregation {stage}", reason)
        return Message(
            Error(code=SECAGG_ERROR_CODE, reason=f"secure aggregation: {reason}"), reply_to=msg
        )

    def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY not in msg.content.config_records
        ):
            return call_next(msg, context)
        stage = "envelope"
        try:
            envelope = Envelope.from_fields(msg.content.config_records[RECORD_KEY])
            stage = envelope.stage.value
            if envelope.stage is Stage.SETUP:
                _clear(context)
                return _start(msg, envelope, context)
            if envelope.stage is Stage.PREKEY:
                _clear(context)
                return _prekey(msg, envelope, context)
            if envelope.stage is Stage.PREKEYED:
                _clear(context)
                return _start_prekeyed(msg, envelope, context)
            if envelope.stage is Stage.KEYED_MASKED_INPUT:
                _clear(context)
                return _start_on_server_graph(msg, envelope, context, call_next)
            return _continue(msg, envelope, context, call_next)
        except FedgeError as exc:
            return _refuse(msg, context, stage, str(exc))
        except Exception as exc:
            logger.exception("secure aggregation: unexpected failure at %s", stage)
            return _refuse(msg, context, stage, f"internal error ({type(exc).__name__})")

    return ranked(secagg_mod, ModRank.SECURE_AGGREGATION)
