"""A hostile server and its colluding clients, driving the real client mod through Flower messages.

The honest devices of these tests are the real :func:`fl_client.secagg_mod.make_secagg_mod`
(with their own :class:`fl_client.policy.DevicePolicy`), reached only through Flower
``Message`` objects carrying the real wire codec, exactly as over the network. The
hostile server is test code: it builds whatever setups and requests it likes, acts for
the corrupt clients it colludes with (real :class:`ClientSession` objects under a policy
that accepts anything), and keeps a transcript of every share it ever sees. The question
each test asks of that transcript: can it reconstruct both the self-mask seed and the
masking key of any honest client (which would reveal that client's update)?
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import Mod

from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from secure_agg import wire
from secure_agg.client import ClientSession
from secure_agg.crypto import public_key_of
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import RECORD_KEY, Envelope, Stage
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.masking import self_mask_commitment
from secure_agg.messages import EncryptedShares, KeyAdvertisement, RoundSetup, UnmaskResponse
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom, RandomSource
from secure_agg.server import ServerSession
from secure_agg.shamir import CHUNKS_PER_SECRET, combine
from strategies.rotation import rotated_length

T = TypeVar("T")

MODEL_SIZE = 6


def train(msg: Message, context: Context) -> Message:
    """A device's training: its update is its partition id in every coordinate."""
    arrays = msg.content.array_records["arrays"]
    delta = np.float32(0.01 * (int(context.node_config["partition-id"]) + 1))
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + delta)})
    metrics = MetricRecord({"num-examples": 1})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def model_content() -> RecordDict:
    """The train message's model and config (what a strategy would send)."""
    arrays = ArrayRecord({"w": Array(np.zeros(MODEL_SIZE, np.float32))})
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})


@dataclass
class Fleet:
    """Honest devices: the real client mod, each with its own policy, identity and state."""

    nodes: Sequence[int]
    policy: DevicePolicy
    identities: Mapping[int, NodeIdentity]
    mods: dict[int, Mod] = field(default_factory=dict)
    contexts: dict[int, Context] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, node in enumerate(self.nodes):
            self.mods[node] = make_secagg_mod(
                policy=self.policy,
                identities=self._identity_of,
                rng_factory=_seeded(10_000 + node),
            )
            self.contexts[node] = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": index},
                state=RecordDict(),
                run_config={},
            )

    def _identity_of(self, context: Context) -> NodeIdentity | None:
        return self.identities.get(context.node_id)

    def send(
        self,
        node: int,
        stage: Stage,
        round_id: bytes,
        message: object,
        *,
        base: RecordDict | None = None,
        handler: Callable[[Message, Context], Message] = train,
    ) -> Message:
        """Deliver one stage message to ``node`` and return its reply."""
        envelope = Envelope(stage, round_id, wire.encode(message))
        content = RecordDict(dict(base or {}))
        fields: dict[str, ConfigRecordValues] = {**envelope.to_fields()}
        content[RECORD_KEY] = ConfigRecord(fields)
        metadata = Metadata(
            run_id=1,
            message_id=f"{stage.value}-{node}",
            src_node_id=0,
            dst_node_id=node,
            reply_to_message_id="",
            group_id="1",
            created_at=0.0,
            ttl=600.0,
            message_type=MessageType.TRAIN,
        )
        delivered: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
        return self.mods[node](delivered, self.contexts[node], handler)

    def holds_state(self, node: int) -> bool:
        """Whether the device still keeps a round's secrets."""
        return "fedge.secagg.session" in self.contexts[node].state


def keys_agreed(fleet: Fleet, *, seed: int) -> tuple[ServerSession, Mapping[int, object]]:
    """Run an honest server (k 6, t 4, 32-bit ring) to the masked-input stage with ``fleet``.

    Returns the server and the masked-input request of each device.
    """
    server = ServerSession(
        list(fleet.nodes),
        degree=6,
        threshold=4,
        encoding=EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=len(fleet.nodes)),
        vector_length=rotated_length(MODEL_SIZE),
        threat_model=ThreatModel.SEMI_HONEST,
        rng=DeterministicRandom(seed),
    )
    setups = server.setups()
    adverts = {
        n: decode(fleet.send(n, Stage.SETUP, server.round_id, setups[n]), KeyAdvertisement)
        for n in fleet.nodes
    }
    requests = server.receive_adverts(adverts)
    shares = {
        n: decode(fleet.send(n, Stage.SHARE_KEYS, server.round_id, r), EncryptedShares)
        for n, r in requests.items()
    }
    return server, server.receive_shares(shares)


def _seeded(seed: int) -> Callable[[], RandomSource]:
    return lambda: DeterministicRandom(seed)


def decode(reply: Message, kind: type[T]) -> T:
    """Decode a device's reply with the real codec (it must not be an error)."""
    assert not reply.has_error(), reply.error.reason
    envelope = Envelope.from_fields(reply.content.config_records[RECORD_KEY])
    return wire.decode(envelope.payload, kind)


def error_of(reply: Message) -> str:
    """The reason of an error reply."""
    assert reply.has_error(), "the device answered instead of refusing"
    return reply.error.reason or ""


class _AnythingGoes(ProtocolPolicy):
    """A colluding client's "policy": it goes along with whatever the server sets."""

    def check_setup(self, setup: RoundSetup) -> None:
        del setup

    def check_survivors(self, survivors: int, *, required: int = 0) -> None:
        del survivors, required


def lax_policy(threat: ThreatModel, authority: bytes | None) -> ProtocolPolicy:
    """The policy of a corrupt client: it accepts any setup and any survivor set."""
    return _AnythingGoes(threat_model=threat, authority_public_key=authority)


@dataclass
class Transcript:
    """Every share the hostile server ever saw, by owner: (holder, kind) -> share."""

    shares: dict[int, dict[tuple[int, str], np.ndarray]] = field(default_factory=dict)

    def add(self, owner: int, holder: int, kind: str, share: np.ndarray) -> None:
        self.shares.setdefault(owner, {})[(holder, kind)] = np.asarray(share, np.uint32)

    def add_response(self, response: UnmaskResponse) -> None:
        for owner, share in response.self_mask_shares.items():
            self.add(owner, response.node_id, "self", share)
        for owner, share in response.mask_key_shares.items():
            self.add(owner, response.node_id, "key", share)

    def add_corrupt_holdings(self, holder: int, session: ClientSession) -> None:
        """A colluding client hands over both halves of every share it holds."""
        for owner, share in session._held.items():
            self.add(owner, holder, "self", share[:CHUNKS_PER_SECRET])
            self.add(owner, holder, "key", share[CHUNKS_PER_SECRET:])

    def count(self, owner: int, kind: str) -> int:
        return sum(1 for (_, k) in self.shares.get(owner, {}) if k == kind)

    def reconstructs(
        self, owner: int, kind: str, advert: KeyAdvertisement, round_id: bytes
    ) -> bool:
        """Whether some threshold-sized set of shares yields the committed secret."""
        mine = {h: s for (h, k), s in self.shares.get(owner, {}).items() if k == kind}
        holders = advert.holders
        for size in range(1, len(mine) + 1):
            for subset in itertools.islice(itertools.combinations(sorted(mine), size), 200):
                xs = [holders.index(h) + 1 for h in subset]
                secrets = combine(xs, np.stack([mine[h] for h in subset]), num_secrets=1)
                if secrets is None:
                    continue
                secret = secrets[0]
                if kind == "self":
                    if self_mask_commitment(round_id, owner, secret) == advert.self_mask_commitment:
                        return True
                elif public_key_of(secret) == advert.mask_public:
                    return True
        return False

    def exposed(
        self, honest: Iterable[int], adverts: Mapping[int, KeyAdvertisement], round_id: bytes
    ) -> list[int]:
        """The honest clients whose self-mask seed AND masking key the transcript reconstructs."""
        return [
            owner
            for owner in honest
            if owner in adverts
            and self.reconstructs(owner, "self", adverts[owner], round_id)
            and self.reconstructs(owner, "key", adverts[owner], round_id)
        ]


def enrol(nodes: Iterable[int], authority: EnrolmentAuthority) -> dict[int, NodeIdentity]:
    """Certify a device identity per node."""
    rng = DeterministicRandom(99)
    return {n: authority.enrol(f"device-{n}", rng) for n in nodes}
