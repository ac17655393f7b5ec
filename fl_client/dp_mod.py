"""Client-level DP on the device as a Flower mod: clip for central DP, clip and noise for local DP.

Place it innermost, next to the train handler (``ClientApp(mods=[secagg_mod,
dp_mod])``): it sees the train message the server (or the secure-aggregation
mod) hands on and rewrites the handler's reply:

- ``fedge.cdp`` record (central DP): the update (local - global) is clipped to
  the round's L2 bound; with adaptive clipping the reply also carries the bit
  [||update|| <= C] for the secure-aggregation mod to sum — refused outside
  secure aggregation, where the bit would travel in clear;
- ``fedge.ldp`` record (local DP): the update is clipped and noised here, so
  what leaves the device is already private.

In both modes the reply's example count becomes 1 (the server averages
unweighted, which the sensitivity bound needs) and the training loss is not
sent: per-client metrics are outside the DP guarantee. A round whose clip or
noise multiplier is outside the device's policy is refused before training.
"""

from __future__ import annotations

import copy
import hmac
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Final

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedge.errors import ConfigError, FedgeError
from fl_client.mod_order import ModRank, ranked
from fl_client.policy import DevicePolicy
from fl_client.refusals import RefusalRecorder, ignore_refusal
from fl_client.updates import apply_update, flat_update
from secure_agg.randomness import RandomSource, SystemRandomSource
from strategies.central import (
    CDP_RECORD_KEY,
    LDP_RECORD_KEY,
    UNCLIPPED_METRIC,
    CentralDpRound,
    LocalDpSettings,
    local_privatise,
)
from strategies.clipping import clip_l2

__all__ = ["DP_ERROR_CODE", "SECURE_MARKER_KEY", "make_dp_mod", "secure_marker"]

logger = logging.getLogger(__name__)

DP_ERROR_CODE: Final = 4311
SECURE_MARKER_KEY: Final = "fedge.secure-inner"
# The marker is a secret of this process, not a flag: a server that writes a record
# under SECURE_MARKER_KEY into a plain train message cannot guess it, so it cannot
# make the device send its adaptive-clipping bit in clear.
_MARKER_SECRET: Final = secrets.token_bytes(32)
_WEIGHT_KEY: Final = "num-examples"


def _single_key(records: Mapping[str, object], kind: str) -> str:
    if len(records) != 1:
        raise ConfigError(f"the train reply must carry exactly one {kind} record")
    return next(iter(records))


def make_dp_mod(
    *,
    policy: DevicePolicy,
    rng_factory: Callable[[], RandomSource] = SystemRandomSource,
    on_refusal: RefusalRecorder = ignore_refusal,
) -> Mod:
    """Return the mod that applies central-DP clipping or local DP to the train reply.

    Train messages without a ``fedge.cdp`` or ``fedge.ldp`` record pass through
    untouched; the others are checked against ``policy`` first (required: no
    default trusts the server's clip or noise).
    """

    def dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        cdp_fields = msg.content.config_records.get(CDP_RECORD_KEY)
        ldp_fields = msg.content.config_records.get(LDP_RECORD_KEY)
        if cdp_fields is None and ldp_fields is None:
            return call_next(msg, context)
        try:
            if cdp_fields is not None and ldp_fields is not None:
                raise ConfigError("a round asks for central and local DP at once")
            central = None if cdp_fields is None else CentralDpRound.from_fields(cdp_fields)
            local = None if ldp_fields is None else LocalDpSettings.from_fields(ldp_fields)
            if central is not None:
                policy.check_central(central)
            if local is not None:
                policy.check_local(local)
            inside_secure = _is_secure_marker(msg.content.config_records.get(SECURE_MARKER_KEY))
            if central is not None and central.adaptive and not inside_secure:
                raise ConfigError(
                    "adaptive clipping sends a clipped-update bit: refused outside secure "
                    "aggregation, where it would travel in clear"
                )
            sent = msg.content.array_records
            if len(sent) != 1:
                raise ConfigError("the train message must carry exactly one ArrayRecord")
            global_arrays = next(iter(sent.values()))
            stripped = copy.copy(msg)
            stripped.content = RecordDict(
                {
                    k: v
                    for k, v in msg.content.items()
                    if k not in (CDP_RECORD_KEY, LDP_RECORD_KEY, SECURE_MARKER_KEY)
                }
            )
            reply = call_next(stripped, context)
            if reply.has_error():
                return reply
            arrays_key = _single_key(reply.content.array_records, "arrays")
            metrics_key = _single_key(reply.content.metric_records, "metrics")
            update = flat_update(global_arrays, reply.content.array_records[arrays_key])
            metrics: dict[str, int | float | list[int] | list[float]] = {_WEIGHT_KEY: 1}
            if central is not None:
                clipped = clip_l2(update, central.l2_clip)
                private = clipped.update
                if central.adaptive:
                    metrics[UNCLIPPED_METRIC] = 0.0 if clipped.clipped else 1.0
            else:
                assert local is not None
                private = local_privatise(update, local, rng_factory())
            content = RecordDict(
                {
                    arrays_key: apply_update(global_arrays, private),
                    metrics_key: MetricRecord(metrics),
                }
            )
            return Message(content=content, reply_to=msg)
        except FedgeError as exc:
            logger.warning("differential privacy: refusing the round: %s", exc)
            on_refusal(context, "differential privacy", str(exc))
            return Message(Error(code=DP_ERROR_CODE, reason=f"dp: {exc}"), reply_to=msg)

    return ranked(dp_mod, ModRank.CLIENT_DP)


def secure_marker() -> ConfigRecord:
    """Return the record the secure-aggregation mod adds to the train message it hands on.

    It carries a secret of this process: only a mod of this device can make it.
    """
    return ConfigRecord({"secret": _MARKER_SECRET})


def inside_secure_round(content: RecordDict) -> bool:
    """Return whether ``content`` came through this device's secure-aggregation mod."""
    return _is_secure_marker(content.config_records.get(SECURE_MARKER_KEY))


def _is_secure_marker(record: ConfigRecord | None) -> bool:
    if record is None or set(record.keys()) != {"secret"}:
        return False
    secret = record["secret"]
    return isinstance(secret, bytes) and hmac.compare_digest(secret, _MARKER_SECRET)
