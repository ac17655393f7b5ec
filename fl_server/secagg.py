"""The server side of fedge secure aggregation for Flower's Message API.

:class:`SecureAggregationGrid` wraps the Grid a ServerApp receives. Any
strategy of ``flwr.serverapp.strategy`` (FedAvg, FedProx, FedAdam, ...) keeps
sampling nodes and building train messages; when it sends them, the wrapper
runs a whole SecAgg+ round with those nodes instead of collecting their models:

1. each node's ``RoundSetup`` -> key advertisements; 2. share keys;
3. the train message with the routed shares -> masked updates;
4. consistency check (active model); 5. unmask;

or, with keys announced in advance (``SecAggConfig.prekeys``, which fedge's
simulations and deployments turn on): each device's last reply of a round
carries the public keys of its next participation, and a round starts with the
setup and every participant's pre-key, answered by advertisement and sealed
shares at once (1+2 in one trip; devices without a usable pre-key are first
asked for one, in a trip of those devices only);

then decodes the exact sum, adds the weighted mean update to the global model
and hands the strategy ONE reply: the new model with the total weight as its
example count. ``aggregate_train`` of a weighted-mean strategy returns it
unchanged; server optimisers (FedAdam, FedYogi, ...) apply their step to it.
Nodes that dropped or misbehaved come back as error replies, so the strategy's
failure accounting keeps working. Evaluation messages pass through untouched.

Notes
-----
The server never sees an individual update: only the sum of the survivors'
clipped, quantised updates. Per-client metrics are not collected. A round
that cannot complete (too few live neighbours) yields error replies only, and
the strategy keeps the previous model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedge.errors import ConfigError
from fl_server._grid import ForwardingGrid
from fl_server.secagg_config import (
    PARTICIPANTS_FIELD,
    PARTICIPANTS_RECORD_KEY,
    SecAggConfig,
    SecAggRoundStats,
)
from fl_server.secagg_prekeys import PreKeyStore
from secure_agg import wire
from secure_agg.encoding import EncodingConfig, decode_sum
from secure_agg.envelope import (
    PREKEY_FIELD,
    PREKEY_RECORD_KEY,
    RECORD_KEY,
    VECTOR_KEY,
    VECTOR_RECORD_KEY,
    Envelope,
    Stage,
)
from secure_agg.errors import CryptoError, InvalidMessage, ProtocolAbort
from secure_agg.messages import (
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputReport,
    MaskedInputRequest,
    PreKey,
    PrekeyedShares,
    PreKeyRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_agg.params import ThreatModel, choose_neighbourhood, corrupt_count
from secure_agg.randomness import RandomSource, SystemRandomSource
from secure_agg.server import ServerSession
from strategies import vectors
from strategies.accounting import PrivacySpend
from strategies.central import (
    CDP_RECORD_KEY,
    CENTRED_BITS_METRIC,
    SENSITIVITY_METRIC,
    CentralDpRound,
    secure_l2_bound,
)
from strategies.ddp import DDP_RECORD_KEY, DdpConfig, DistributedDpSettings, ddp_decode_sum
from strategies.rotation import rotated_length
from strategies.sample_ddp import (
    SDDP_RECORD_KEY,
    SampleDdpConfig,
)

__all__ = [
    "SECAGG_ABORT_CODE",
    "PrivacyGuard",
    "SecAggConfig",
    "SecAggRoundStats",
    "SecureAggregationGrid",
    "noise_in_clips",
    "payload_bytes",
]

logger = logging.getLogger(__name__)

SECAGG_ABORT_CODE: Final = 4302
_ARRAYS_KEY: Final = "arrays"
_METRICS_KEY: Final = "metrics"
T = TypeVar("T")
# Called with a distributed-DP round's rho and its survivors' subjects before unmasking.
_DISTRIBUTED_MECHANISM = "distributed-ddg"
# Distributed DP whose averaged update carries noise of more than this many clips (in L2
# norm) is worth a warning: the model is unlikely to learn (too few clients for the model).
_NOISE_WARNING_CLIPS = 10.0
# The stages whose requests carry the train message (the devices train in them).
_TRAINING_STAGES: Final = frozenset({Stage.MASKED_INPUT, Stage.KEYED_MASKED_INPUT})
_NOISE_ADVICE = (
    "expect slow or no learning; more clients per round, a smaller model or less noise "
    "(a larger epsilon) help"
)


def noise_in_clips(
    *, noise_std_of_sum: float, dimension: int, survivors: int, l2_clip: float
) -> float:
    """Return the L2 norm of the averaged update's noise, in clips.

    The noise is ``noise_std_of_sum`` per coordinate of the sum of ``survivors``
    updates; the rotation keeps norms, so the mean of ``dimension`` values carries
    noise of L2 norm ~ std sqrt(d) / n, against at most one clip of signal.
    """
    return noise_std_of_sum * math.sqrt(dimension) / survivors / l2_clip


PrivacyGuard = Callable[[PrivacySpend, Sequence[str]], None]


def payload_bytes(content: RecordDict) -> int:
    """Return the bytes a message's records carry (8 per number, the length of bytes and text)."""
    total = 0
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    for arrays in content.array_records.values():
        total += sum(len(a.data) for a in arrays.values())
    for metrics in content.metric_records.values():
        total += 8 * len(metrics)
    return total


def _envelope_content(envelope: Envelope, base: Mapping[str, Any] | None = None) -> RecordDict:
    fields: dict[str, ConfigRecordValues] = {**envelope.to_fields()}
    content = RecordDict(dict(base or {}))
    content[RECORD_KEY] = ConfigRecord(fields)
    return content


class _Round:
    """One secure round driven over a Grid."""

    def __init__(
        self,
        grid: Grid,
        config: SecAggConfig,
        messages: list[Message],
        rng: RandomSource,
        *,
        timeout: float | None,
        guard: PrivacyGuard | None = None,
        prekeys: PreKeyStore | None = None,
    ) -> None:
        self.grid = grid
        self.guard = guard
        self.config = config
        self.timeout = timeout
        self.started = time.monotonic()
        self.by_node = {m.metadata.dst_node_id: m for m in messages}
        template = messages[0]
        self.group_id = template.metadata.group_id
        self.content = template.content
        self.arrays = _global_arrays(messages)
        self.keys = list(self.arrays.keys())
        self.length = sum(int(np.prod(self.arrays[k].shape)) for k in self.keys)
        self.rng = rng
        self.prekeys = prekeys
        nodes = sorted(self.by_node)
        self.stats = SecAggRoundStats(
            server_round=_round_number(self.content),
            sampled=len(nodes),
            degree=0,
            threshold=0,
            ring_bits=config.ring_bits,
            quant_bits=0,
        )
        self._plan(nodes)
        self.uploaded = 0

    def _plan(self, nodes: list[int]) -> None:
        """Size the round for ``nodes``: k and t, the encoding, DP, and its protocol session."""
        self.nodes = nodes
        if self.config.degree is None:
            params = choose_neighbourhood(
                len(nodes),
                dropout_fraction=self.config.dropout_fraction,
                corrupt_fraction=self.config.corrupt_fraction,
                threat_model=self.config.threat_model,
            )
            degree, threshold = params.degree, params.threshold
        else:
            assert self.config.threshold is not None
            degree, threshold = self.config.degree, self.config.threshold
        self.ddp: DdpConfig | None = None
        self.sddp: SampleDdpConfig | None = None
        self.min_honest = 0
        self.train_content = self.content
        self.extra_metrics: dict[str, float] = {}
        cdp_fields = self.content.config_records.get(CDP_RECORD_KEY)
        self.central = None if cdp_fields is None else CentralDpRound.from_fields(cdp_fields)
        if self.central is not None:
            if self.config.distributed_dp is not None:
                raise ConfigError("a round cannot run central and distributed DP at once")
            # Central DP: unweighted clipped updates, whose coordinates lie in [-C, C];
            # with adaptive clipping one more coordinate carries the centred bit (times C).
            self.vector_length = self.length + (2 if self.central.adaptive else 1)
            self.encoding = EncodingConfig(
                clip_range=self.central.l2_clip,
                ring_bits=self.config.ring_bits,
                max_clients=len(nodes),
                weight_cap=1,
            )
            # Clients round conditionally to this bound; the noise is calibrated to it.
            self.extra_metrics[SENSITIVITY_METRIC] = secure_l2_bound(
                self.central.l2_clip, self.length, self.encoding
            )
        elif self.config.distributed_dp is None:
            self.vector_length = self.length + 1
            self.encoding = EncodingConfig(
                clip_range=self.config.clip_range,
                ring_bits=self.config.ring_bits,
                max_clients=len(nodes),
                weight_cap=self.config.weight_cap,
            )
        else:
            self.min_honest = self.config.min_honest_contributors(len(nodes))
            # The rotation's signs are public: a fresh seed per round, sent to every client.
            round_config = self.config.distributed_dp.for_round(
                dimension=self.length,
                sampled=len(nodes),
                min_honest=self.min_honest,
                rotation_seed=self.rng.random_bytes(32),
            )
            fields: dict[str, ConfigRecordValues] = {**round_config.to_fields()}
            self.train_content = RecordDict(dict(self.content))
            if isinstance(round_config, SampleDdpConfig):
                # Shared-noise DP-SGD: the devices send clipped gradient sums on this ring.
                self.sddp = round_config
                self.ddp = round_config.ring
                self.train_content[SDDP_RECORD_KEY] = ConfigRecord(fields)
            else:
                self.ddp = round_config
                self.train_content[DDP_RECORD_KEY] = ConfigRecord(fields)
            self.vector_length = rotated_length(self.length)
            self.encoding = EncodingConfig(
                clip_range=1.0, ring_bits=self.ddp.ring_bits, max_clients=len(nodes)
            )
        self.session = ServerSession(
            nodes,
            degree=degree,
            threshold=threshold,
            encoding=self.encoding,
            vector_length=self.vector_length,
            threat_model=self.config.threat_model,
            rng=self.rng,
            authority_public_key=self.config.authority_public_key,
            server_graph=self.config.server_graph,
        )
        self.stats.degree = self.session.degree
        self.stats.threshold = threshold
        self.stats.ring_bits = self.encoding.ring_bits
        self.stats.quant_bits = self.encoding.quant_bits

    def exchange(
        self,
        stage: Stage,
        requests: Mapping[int, object],
        decode: Callable[[int, Envelope, Message], T],
    ) -> dict[int, T]:
        """Send each node its request (a protocol message, or its wire bytes) and decode replies.

        A node whose reply is missing, an error or malformed is recorded in the
        round's failures and left out of the result.
        """
        started = time.perf_counter()
        round_id = self.session.round_id
        wait = self._stage_wait(stage)
        # Without stage deadlines, messages keep Flower's default TTL, as they always did.
        ttl = None if self.config.masked_input_share is None else wait
        outgoing = []
        for node, request in requests.items():
            payload = request if isinstance(request, bytes) else wire.encode(request)
            envelope = Envelope(stage, round_id, payload)
            base = self.train_content if stage in _TRAINING_STAGES else None
            outgoing.append(
                Message(
                    content=_envelope_content(envelope, base),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                    group_id=self.group_id,
                    ttl=ttl,
                )
            )
        replies = self.grid.send_and_receive(outgoing, timeout=wait)
        out: dict[int, T] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in requests or node in out or node in self.stats.failures:
                continue
            if reply.has_error():
                self.stats.failures[node] = f"{stage.value}: {reply.error.reason}"
                continue
            try:
                record = reply.content.config_records.get(RECORD_KEY)
                if record is None:
                    raise InvalidMessage("reply without the secure-aggregation envelope")
                envelope = Envelope.from_fields(record)
                if envelope.stage is not stage or envelope.round_id != round_id:
                    raise InvalidMessage("reply for another stage or round")
                out[node] = decode(node, envelope, reply)
            except (InvalidMessage, KeyError, TypeError, ValueError) as exc:
                self.stats.failures[node] = f"{stage.value}: malformed reply: {exc}"
                logger.warning("secure aggregation: node %d sent a malformed reply: %s", node, exc)
                continue
            self.uploaded += payload_bytes(reply.content)
            if self.prekeys is not None and stage is Stage.UNMASK:
                self._file_prekey(node, reply)
        for node in requests:
            if node not in out and node not in self.stats.failures:
                self.stats.failures[node] = f"{stage.value}: no reply"
        self.stats.stage_seconds[stage.value] = round(time.perf_counter() - started, 4)
        return out

    def _stage_wait(self, stage: Stage) -> float | None:
        """Return how long ``stage`` may wait: until its share of the round's deadline.

        Without ``masked_input_share``, every stage waits the whole ``timeout``.

        Each stage ends at a fixed point of the round (masked input, the devices'
        training, gets ``masked_input_share``; the others share the rest), so a slow
        stage cannot eat the time of the next one, and time a fast stage leaves
        rolls over to the next. Its messages expire then (Flower's TTL): a device
        never receives a stage message the server has stopped waiting for.
        """
        share = self.config.masked_input_share
        if self.timeout is None or share is None:
            return self.timeout
        if self.prekeys is None:
            stages = [Stage.SETUP, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK]
        elif self.config.server_graph:
            stages = [Stage.PREKEY, Stage.KEYED_MASKED_INPUT, Stage.UNMASK]
        else:
            # The pre-key trip's share rolls over to the next stage when it does not run.
            stages = [Stage.PREKEY, Stage.PREKEYED, Stage.MASKED_INPUT, Stage.UNMASK]
        if self.config.threat_model is ThreatModel.ACTIVE:
            stages.insert(3, Stage.CONSISTENCY)
        other = (1 - share) / (len(stages) - 1)
        shares = [share if s in _TRAINING_STAGES else other for s in stages]
        end = self.started + self.timeout * sum(shares[: stages.index(stage) + 1])
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise ProtocolAbort(stage.value, [], "the round's deadline passed")
        return remaining

    def _take_prekeys(self, store: PreKeyStore) -> dict[int, PreKey]:
        """Return every participant's pre-key, after asking the nodes without one for one.

        A node that announces no valid pre-key leaves the round before it starts,
        and the round is sized again for the others (k, t, encoding and DP).
        """
        missing = store.missing(self.nodes)
        if missing:
            asks = {node: PreKeyRequest(node) for node in missing}
            announced = self.exchange(Stage.PREKEY, asks, self._announced_prekey)
            lost = set(missing) - set(announced)
            if lost:
                kept = [n for n in self.nodes if n not in lost]
                if len(kept) < max(2, self.config.min_clients):
                    raise ProtocolAbort(
                        Stage.PREKEY.value, sorted(lost), f"{len(kept)} nodes announced keys"
                    )
                self._plan(kept)
        return store.take(self.nodes)

    def _keyed_in_advance(self, store: PreKeyStore) -> dict[int, MaskedInputRequest]:
        """Run setup and share keys in one trip (after the pre-key trip, if one is needed)."""
        prekeys = self._take_prekeys(store)  # first: the round may be re-planned without some
        setups = self.session.prekeyed_setups(prekeys)
        shared = wire.prekey_list(next(iter(setups.values())).prekeys)
        requests = {
            node: wire.encode_prekeyed_setup(request.setup, shared)
            for node, request in setups.items()
        }
        replies = self.exchange(
            Stage.PREKEYED,
            requests,
            lambda node, envelope, reply: wire.decode(envelope.payload, PrekeyedShares),
        )
        return self.session.receive_prekeyed(replies)

    def _on_server_graph(self, store: PreKeyStore) -> dict[int, UnmaskRequest]:
        """Run setup, share keys and masked input in one trip, on a graph this server drew."""
        prekeys = self._take_prekeys(store)  # first: the round may be re-planned without some
        setups = self.session.graph_setups(prekeys)
        shared = wire.prekey_list(next(iter(setups.values())).prekeys)
        requests = {
            node: wire.encode_graph_setup(request.setup, shared, request.holders, request.drawn_by)
            for node, request in setups.items()
        }
        replies = self.exchange(Stage.KEYED_MASKED_INPUT, requests, self.keyed_masked_vector)
        return self.session.receive_graph(replies)

    def keyed_masked_vector(
        self, node: int, envelope: Envelope, reply: Message
    ) -> tuple[PrekeyedShares, MaskedInput]:
        """Decode a server-drawn graph's first reply: the keys and shares, and the masked vector."""
        shares = wire.decode(envelope.payload, PrekeyedShares)
        return shares, MaskedInput(node_id=node, vector=self._vector_of(reply))

    def _announced_prekey(self, node: int, envelope: Envelope, reply: Message) -> PreKey:
        assert self.prekeys is not None
        prekey = wire.decode(envelope.payload, PreKey)
        problem = self.prekeys.offer(node, prekey)
        if problem is not None:
            raise InvalidMessage(problem)
        return prekey

    def _file_prekey(self, node: int, reply: Message) -> None:
        """Keep the next pre-key a node sent with its last reply, if it is valid."""
        assert self.prekeys is not None
        record = reply.content.config_records.get(PREKEY_RECORD_KEY)
        if record is None:
            return
        try:
            raw = record[PREKEY_FIELD]
            if not isinstance(raw, bytes):
                raise InvalidMessage("the pre-key field must be bytes")
            problem = self.prekeys.offer(node, wire.decode(raw, PreKey))
        except (InvalidMessage, KeyError) as exc:
            problem = str(exc)
        if problem is not None:
            logger.warning(
                "secure aggregation: node %d announced an unusable pre-key: %s", node, problem
            )

    def masked_vector(self, node: int, envelope: Envelope, reply: Message) -> MaskedInput:
        report = wire.decode(envelope.payload, MaskedInputReport)
        if report.node_id != node:
            raise InvalidMessage("masked-input report for another node")
        return MaskedInput(node_id=node, vector=self._vector_of(reply), rejected=report.rejected)

    def _vector_of(self, reply: Message) -> npt.NDArray[np.unsignedinteger[Any]]:
        array = reply.content.array_records[VECTOR_RECORD_KEY][VECTOR_KEY]
        # Check the declared type and size before numpy allocates anything.
        if np.dtype(array.dtype) != self.encoding.dtype or tuple(array.shape) != (
            self.vector_length,
        ):
            raise InvalidMessage("masked vector of the wrong type or length")
        return array.numpy()

    def _until_masked(self) -> Mapping[int, object]:
        """Run the round up to the fixed survivor set; return the next stage's requests."""
        session = self.session
        if self.prekeys is not None and self.config.server_graph:
            return self._on_server_graph(self.prekeys)
        if self.prekeys is None:
            adverts = self.exchange(Stage.SETUP, session.setups(), _payload(KeyAdvertisement))
            share_requests = session.receive_adverts(adverts)
            shares = self.exchange(Stage.SHARE_KEYS, share_requests, _payload(EncryptedShares))
            masked_requests = session.receive_shares(shares)
        else:
            masked_requests = self._keyed_in_advance(self.prekeys)
            session = self.session  # re-planned if a node announced no pre-key
        masked = self.exchange(Stage.MASKED_INPUT, masked_requests, self.masked_vector)
        return session.receive_masked(masked)  # the session keeps only the survivors' sum

    def run(self) -> tuple[ArrayRecord, int]:
        after_masked = self._until_masked()
        session = self.session
        spend = None
        if self.ddp is not None:
            # The survivors (whose noise is in the sum) are fixed now. Every device refuses
            # to unmask unless they hold its policy's fewest honest clients; the server
            # refuses the same round first, before anyone is asked to reveal anything.
            survivors = len(session.survivors)
            honest = survivors - corrupt_count(len(self.nodes), self.config.corrupt_fraction)
            if honest < self.min_honest:
                raise ProtocolAbort(
                    "masked-input",
                    [],
                    f"{survivors} survivors hold at most {max(honest, 0)} honest clients, "
                    f"distributed DP needs {self.min_honest}",
                )
            spend = self._spend()
            if self.guard is not None:
                # A round whose spend would break the budget stops here, revealing nothing.
                self.guard(spend, self._subjects(session.survivors))
        if self.config.threat_model is ThreatModel.ACTIVE:
            signatures = self.exchange(
                Stage.CONSISTENCY, after_masked, _payload(ConsistencySignature)
            )
            unmask_requests: Mapping[int, object] = session.receive_signatures(signatures)
        else:
            unmask_requests = after_masked
        responses = self.exchange(Stage.UNMASK, unmask_requests, _payload(UnmaskResponse))
        result = session.finish(responses)
        for node, reason in session.excluded.items():
            self.stats.failures.setdefault(node, f"excluded: {reason}")
        if self.ddp is None or spend is None:
            mean, total_weight = decode_sum(result.total, config=self.encoding)
            if self.central is not None and self.central.adaptive:
                # Only the sum of the centred bits b - 1/2 is ever known, never one client's.
                scaled = float(mean[self.length]) / self.encoding.clip_range * total_weight
                self.extra_metrics[CENTRED_BITS_METRIC] = scaled / 2
                mean = mean[: self.length]
        else:
            survivors = len(result.survivors)
            mean = ddp_decode_sum(result.total, self.ddp, num_clients=survivors)
            total_weight = survivors
            # What every device charged itself: the noise of the fewest honest clients.
            self.stats.dp = {
                "rho": spend.rho,
                "min_honest_contributors": self.min_honest,
                "noise_std_of_sum": self.ddp.noise_std * math.sqrt(survivors),
                "honest_noise_std_of_sum": self.ddp.noise_std * math.sqrt(self.min_honest),
                "l2_clip": self.ddp.l2_clip,
            }
        self.stats.spend = spend
        self.stats.survivors = len(result.survivors)
        self.stats.survivor_ids = sorted(result.survivors)
        self.stats.survivor_subjects = self._subjects(result.survivors)
        self.stats.dropped = self.stats.sampled - len(result.survivors)
        self.stats.total_weight = total_weight
        self.stats.upload_bytes_per_client = self.uploaded / max(1, len(result.survivors))
        return self._apply(mean), total_weight

    def _subjects(self, nodes: Iterable[int]) -> list[str]:
        """Name clients as the ledgers do: the enrolment id they advertised, else the node id."""
        return [self.session.identity_of(node) or str(node) for node in sorted(nodes)]

    def _spend(self) -> PrivacySpend:
        """Return what every survivor's device charged itself (its policy's fewest honest)."""
        if self.sddp is not None:
            return self.sddp.spend(self.min_honest)
        return PrivacySpend(mechanism=_DISTRIBUTED_MECHANISM, rho=self._rho())

    def _rho(self) -> float:
        assert self.ddp is not None
        return self.ddp.rho(self.min_honest)

    def _apply(self, mean: npt.NDArray[np.float64]) -> ArrayRecord:
        updated = vectors.apply({key: self.arrays[key].numpy() for key in self.keys}, mean)
        return ArrayRecord({key: Array(value) for key, value in updated.items()})


def _payload(kind: type[T]) -> Callable[[int, Envelope, Message], T]:
    """Decode a reply's envelope payload as ``kind``."""
    return lambda node, envelope, reply: wire.decode(envelope.payload, kind)


def _round_number(content: RecordDict) -> int:
    # Flower's strategies put the round in every train config as "server-round".
    for record in content.config_records.values():
        value = record.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def _global_arrays(messages: list[Message]) -> ArrayRecord:
    records = [m.content.array_records for m in messages]
    if any(len(r) != 1 for r in records):
        raise ConfigError("secure aggregation needs train messages with exactly one ArrayRecord")
    first = next(iter(records[0].values()))
    for record in records[1:]:
        other = next(iter(record.values()))
        if other is not first and (
            list(other.keys()) != list(first.keys())
            or any(other[k].data != first[k].data for k in first)
        ):
            raise ConfigError("secure aggregation needs every node to receive the same model")
    return first


class SecureAggregationGrid(ForwardingGrid):
    """A Grid that turns each training round into a fedge SecAgg+ round.

    Parameters
    ----------
    grid
        The Grid the ServerApp received.
    config
        How each secure round runs.
    rng
        Source of round ids and neighbour graphs (the OS CSPRNG by default).
    on_round
        Called with each round's statistics (progress displays, audit events).
    privacy_guard
        With distributed DP: called with the round's rho and the subjects of its
        survivors (enrolment ids, else node ids) once they are known and before
        anything is unmasked; raising (e.g. the ledger's ``BudgetExceeded``) stops
        the round with nothing revealed, and the exception reaches the caller of
        ``send_and_receive``.
    """

    def __init__(
        self,
        grid: Grid,
        config: SecAggConfig,
        *,
        rng: RandomSource | None = None,
        on_round: Callable[[SecAggRoundStats], None] | None = None,
        privacy_guard: PrivacyGuard | None = None,
    ) -> None:
        super().__init__(grid)
        self._guard = privacy_guard
        self._config = config
        self._rng = rng or SystemRandomSource()
        self._on_round = on_round
        self._prekeys = (
            PreKeyStore(config.threat_model, config.authority_public_key)
            if config.prekeys
            else None
        )
        self._noise_warned = False

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run a secure round for train messages; pass any other messages through."""
        outgoing = list(messages)
        if not outgoing or any(m.metadata.message_type != MessageType.TRAIN for m in outgoing):
            return self._inner.send_and_receive(outgoing, timeout=timeout)
        if len(outgoing) < self._config.min_clients:
            raise ConfigError(
                f"secure aggregation needs at least {self._config.min_clients} clients per "
                f"round, the strategy sampled {len(outgoing)}"
            )
        secure = _Round(
            self._inner,
            self._config,
            outgoing,
            self._rng,
            timeout=timeout,
            guard=self._guard,
            prekeys=self._prekeys,
        )
        try:
            arrays, total_weight = secure.run()
        except (ProtocolAbort, InvalidMessage, CryptoError) as exc:
            logger.warning("round %d: %s", secure.stats.server_round, exc)
            secure.stats.aborted = str(exc)
            self._report(secure.stats)
            return [
                Message(Error(code=SECAGG_ABORT_CODE, reason=str(exc)), reply_to=m)
                for m in outgoing
            ]
        self._report(secure.stats)
        self._warn_if_noise_drowns(secure)
        template = outgoing[0]
        metrics = MetricRecord(
            {
                self._config.weight_key: total_weight,
                "secagg-survivors": secure.stats.survivors,
                **secure.extra_metrics,
            }
        )
        # Who is inside the sum, for any DP wrapper's per-client accounting.
        subjects = ConfigRecord({PARTICIPANTS_FIELD: list(secure.stats.survivor_subjects)})
        aggregate = Message(
            content=RecordDict(
                {_ARRAYS_KEY: arrays, _METRICS_KEY: metrics, PARTICIPANTS_RECORD_KEY: subjects}
            ),
            reply_to=template,
        )
        failed = [
            Message(Error(code=SECAGG_ABORT_CODE, reason=reason), reply_to=secure.by_node[node])
            for node, reason in sorted(secure.stats.failures.items())
        ]
        return [aggregate, *failed]

    def _report(self, stats: SecAggRoundStats) -> None:
        if self._on_round is not None:
            self._on_round(stats)

    def check_plan(self, *, clients: int, parameters: int) -> None:
        """Warn before the first round when distributed DP's noise would dwarf every update.

        ``clients`` is the number a round is planned to sample and ``parameters``
        the model's size; the estimate assumes every client survives (fewer
        survivors only make it worse). The rounds then do not warn again.
        """
        settings = self._config.distributed_dp
        if self._noise_warned or not isinstance(settings, DistributedDpSettings) or clients < 1:
            return
        try:
            honest = self._config.min_honest_contributors(clients)
        except ConfigError:
            return  # the first round refuses the configuration with this error
        clips = noise_in_clips(
            noise_std_of_sum=settings.noise_share(honest) * math.sqrt(clients),
            dimension=parameters,
            survivors=clients,
            l2_clip=settings.l2_clip,
        )
        if clips > _NOISE_WARNING_CLIPS:
            self._noise_warned = True
            logger.warning(
                "distributed DP: with %d clients a round (all surviving) the averaged update "
                "of %d parameters will carry noise of L2 norm ~%.3g, %.0f times the clip %g: %s",
                clients,
                parameters,
                clips * settings.l2_clip,
                clips,
                settings.l2_clip,
                _NOISE_ADVICE,
            )

    def _warn_if_noise_drowns(self, secure: _Round) -> None:
        """Warn once a run when distributed DP's noise dwarfs any update the mean can hold."""
        dp, survivors = secure.stats.dp, secure.stats.survivors
        # Shared-noise DP-SGD sums many examples' clipped gradients: not this comparison.
        if self._noise_warned or dp is None or secure.sddp is not None or survivors < 1:
            return
        clips = noise_in_clips(
            noise_std_of_sum=dp["noise_std_of_sum"],
            dimension=secure.length,
            survivors=survivors,
            l2_clip=dp["l2_clip"],
        )
        if clips > _NOISE_WARNING_CLIPS:
            self._noise_warned = True
            logger.warning(
                "distributed DP: the averaged update's noise has L2 norm ~%.3g, %.0f times "
                "the clip %g (%d clients, %d parameters): %s",
                clips * dp["l2_clip"],
                clips,
                dp["l2_clip"],
                survivors,
                secure.length,
                _NOISE_ADVICE,
            )
