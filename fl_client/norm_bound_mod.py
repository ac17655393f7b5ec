"""Norm bounding on the device, as a Flower mod: the bound that holds under secure aggregation.

Under secure aggregation the server sees only the sum of the updates, so it
cannot bound (or even look at) any one of them: the bound must be enforced
where the update is still in the clear, on the device. This mod bounds the L2
norm of every train reply's update, ``reply arrays - global arrays``, to a
constant ``max_l2`` of the device's own (never read from a server message),
keeping its direction, then hands the reply outwards to be masked.

Where it sits, outermost first: the secure-aggregation mod, the budget mod, the
client DP mod, **this mod**, then the training (and, in simulations, the attack
mod that stands for a compromised training). Below the secure mod, so the bound
applies to what gets masked; below the DP mod, so local DP's noise is added to
the bounded update (bounding after the noise would clip the noise) and central
DP's clip applies on top (the tighter bound wins); above the training, so
whatever the training returns is bounded.

Notes
-----
Threat model. The mod defends against a device whose *training* is
compromised: poisoned local data (label flipping, backdoor triggers) or a
compromised training loop that boosts its update (model replacement), while
the fedge runtime that runs this mod and the secure-aggregation client is
intact (e.g. a verified runtime image with a tampered data pipeline or model
code). Such a device can still move the aggregate by at most ``max_l2`` divided
by the number of clients per round, in any direction it likes: the bound limits
the damage, it does not detect the attacker (Sun et al. 2019, "Can you really
backdoor federated learning?").

A *fully* compromised device controls its runtime too and can skip this mod; the
server cannot tell, because the masked vector hides the norm. Enforcing a bound
against such a device under secure aggregation needs a zero-knowledge proof of
the update's norm checked by the server (RoFL, Lycklama et al. 2023; ACORN,
Bell et al. 2023), which fedge does not implement. Without secure aggregation the
server bounds every update itself (:class:`fl_server.norm_bounding.NormBounding`)
or uses a robust rule.

Whether an update was scaled down is not reported: like an adaptive-clipping
bit sent in clear, it would tell the server something about one client's data.
"""

from __future__ import annotations

import logging
import math
from typing import Final

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedge.errors import ConfigError, FedgeError
from fl_client.mod_order import ModRank, ranked
from fl_client.updates import apply_update, flat_update
from strategies.norm_bound import bound_update

__all__ = ["NORM_BOUND_ERROR_CODE", "make_norm_bound_mod"]

logger = logging.getLogger(__name__)

NORM_BOUND_ERROR_CODE: Final = 4313


def _only_arrays(content: RecordDict, what: str) -> tuple[str, ArrayRecord]:
    records = content.array_records
    if len(records) != 1:
        raise ConfigError(f"{what} must carry exactly one ArrayRecord, got {len(records)}")
    key = next(iter(records))
    return key, records[key]


def make_norm_bound_mod(max_l2: float) -> Mod:
    """Return the mod that bounds the L2 norm of every train reply's update to ``max_l2``.

    Parameters
    ----------
    max_l2
        The device's bound on ``||reply arrays - global arrays||_2``, finite and > 0.

    Returns
    -------
    Mod
        A Flower mod: messages other than train requests pass through untouched;
        a train reply's arrays are replaced by ``global + bounded update`` and its
        other records (metrics) are kept (the bound holds up to one rounding to
        the model's dtype, e.g. float32). A request or reply whose arrays cannot
        be bounded (not exactly one ArrayRecord, arrays that differ from the global
        model's in names or shapes, NaN or infinite values) gets an error reply
        with code :data:`NORM_BOUND_ERROR_CODE`; the client never crashes and
        nothing unbounded leaves the mod.

    Raises
    ------
    ConfigError
        If ``max_l2`` is not a finite number > 0.
    """
    if isinstance(max_l2, bool) or not isinstance(max_l2, (int, float)):
        raise ConfigError(f"max_l2 must be a number, got {type(max_l2).__name__}")
    if not (math.isfinite(max_l2) and max_l2 > 0):
        raise ConfigError(f"max_l2 must be a finite number > 0, got {max_l2}")
    bound = float(max_l2)

    def norm_bound_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        try:
            # Checked before training: a request without one global model is refused
            # at no cost.
            _, global_arrays = _only_arrays(msg.content, "the train message")
        except FedgeError as exc:
            return _refuse(msg, exc)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            key, local = _only_arrays(reply.content, "the train reply")
            bounded, clipped = bound_update(flat_update(global_arrays, local), bound)
            content = RecordDict(dict(reply.content))
            content[key] = apply_update(global_arrays, bounded)
        except FedgeError as exc:
            return _refuse(msg, exc)
        if clipped:
            # Neither the norm nor the update is logged: only that the bound acted.
            logger.debug("norm bound: the update was scaled down to %g", bound)
        return Message(content=content, reply_to=msg)

    return ranked(norm_bound_mod, ModRank.NORM_BOUND)


def _refuse(msg: Message, exc: FedgeError) -> Message:
    logger.warning("norm bound: refusing the round: %s", exc)
    return Message(Error(code=NORM_BOUND_ERROR_CODE, reason=f"norm bound: {exc}"), reply_to=msg)
