"""The typed settings of a secure round and the statistics it reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedge.errors import ConfigError
from secure_agg.encoding import EncodingConfig
from secure_agg.params import ThreatModel, corrupt_count
from strategies.accounting import PrivacySpend
from strategies.ddp import DistributedDpSettings
from strategies.sample_ddp import SampleDdpSettings

__all__ = ["PARTICIPANTS_FIELD", "PARTICIPANTS_RECORD_KEY", "SecAggConfig", "SecAggRoundStats"]

# The aggregate reply of a secure round names who is inside the sum: a ConfigRecord under
# this key whose PARTICIPANTS_FIELD is a list of subjects (the enrolment id of a certified
# device, else the Flower node id as text), so any DP wrapper can charge them without a hook.
PARTICIPANTS_RECORD_KEY = "fedge.secagg.participants"
PARTICIPANTS_FIELD = "subjects"


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggConfig:
    """How the server runs each secure round.

    Parameters
    ----------
    clip_range
        Each coordinate of a client's update (local - global) is clipped to
        [-clip_range, clip_range] before quantisation.
    ring_bits
        Width of the masked integers (and of the upload per value), 8..64.
    weight_cap
        The largest example count a client's update is weighted by.
    threat_model
        Semi-honest server, or active (signed keys + consistency check; needs
        ``authority_public_key``).
    dropout_fraction, corrupt_fraction
        Tolerated fractions of the sampled clients; with ``degree`` unset they
        choose k and t (Bell et al. 2020 bounds).
    degree, threshold
        k and t given explicitly (both or neither).
    min_clients
        Fewest sampled clients a secure round starts with (>= 2: the sum of
        one client is its update).
    authority_public_key
        The enrolment authority's Ed25519 key (active model).
    weight_key
        The metric the strategy weights replies by.
    distributed_dp
        Add distributed discrete Gaussian noise (clients clip to L2, rotate,
        round and add noise shares): the unmasked sum is already private, the
        mean is unweighted, and ``clip_range``/``weight_cap`` are unused.
    masked_input_share
        With a share (0.6 is a good one), the round's deadline (the Grid's ``timeout``)
        is split among the stages:
        the masked-input stage, where the devices train, ends at its share; the
        other stages share the rest equally. Each stage's messages expire when
        its time is up, and a stage whose time has passed aborts the round.
        ``None`` (deployments): every stage waits the whole ``timeout``, so a
        cold start or a device stuck on a stale task can be outwaited in any stage.
    prekeys
        Key rounds in advance (:mod:`secure_agg.prekeys`): every device announces
        the keys of its next participation with its last reply, and a round whose
        participants all announced one starts with setup and share keys in a single
        trip. A device without a usable pre-key (new, its key used or replaced) is
        asked for one first, in a trip of those devices only. ``False`` (this
        class's default; fedge's simulations and deployments turn it on): every
        round runs the classic advertise-keys and share-keys trips.
    server_graph
        Semi-honest model with ``prekeys``: the server draws every device's holders
        and sends them with the setup, and the devices answer with their keys,
        shares and masked input at once: two full-fleet trips a round instead of
        three. Each device's policy must accept it (``accept_server_graph``); the
        active model never does (the graph must then be the devices' own draw).
    """

    clip_range: float = 0.5
    ring_bits: int = 32
    weight_cap: int = 10_000
    threat_model: ThreatModel = ThreatModel.SEMI_HONEST
    dropout_fraction: float = 0.2
    corrupt_fraction: float = 0.1
    degree: int | None = None
    threshold: int | None = None
    min_clients: int = 2
    authority_public_key: bytes | None = None
    weight_key: str = "num-examples"
    distributed_dp: DistributedDpSettings | SampleDdpSettings | None = None
    masked_input_share: float | None = None
    prekeys: bool = False
    server_graph: bool = False

    def __post_init__(self) -> None:
        # Validates clip_range, ring_bits and weight_cap with the smallest round
        # (distributed DP sums unweighted integers: no weight to make room for).
        EncodingConfig(
            clip_range=self.clip_range,
            ring_bits=self.ring_bits,
            max_clients=self.min_clients,
            weight_cap=self.weight_cap if self.distributed_dp is None else 1,
        )
        if (self.degree is None) != (self.threshold is None):
            raise ConfigError("give both degree and threshold, or neither")
        if self.masked_input_share is not None and not 0 < self.masked_input_share < 1:
            raise ConfigError(
                f"masked_input_share must be in (0, 1), got {self.masked_input_share}"
            )
        if self.min_clients < 2:
            raise ConfigError(f"min_clients must be >= 2, got {self.min_clients}")
        if self.threat_model is ThreatModel.ACTIVE and self.authority_public_key is None:
            raise ConfigError("the active threat model needs the enrolment authority's key")
        if self.server_graph and (
            self.threat_model is not ThreatModel.SEMI_HONEST or not self.prekeys
        ):
            raise ConfigError("server_graph needs the semi-honest model and prekeys")
        for name, value in (
            ("dropout_fraction", self.dropout_fraction),
            ("corrupt_fraction", self.corrupt_fraction),
        ):
            if not 0 <= value < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")

    def min_honest_contributors(self, sampled: int) -> int:
        """Return the fewest honest clients a distributed-DP round of ``sampled`` must hold.

        The configured number, else the survivors the dropout fraction leaves
        less the corrupt ones (at least 1).

        Raises
        ------
        ConfigError
            If the number exceeds the clients sampled.
        """
        settings = self.distributed_dp
        if settings is not None and settings.min_honest_contributors is not None:
            honest = settings.min_honest_contributors
        else:
            expected = math.floor(round(sampled * (1 - self.dropout_fraction), 9))
            honest = max(1, expected - corrupt_count(sampled, self.corrupt_fraction))
        if honest > sampled:
            raise ConfigError(
                f"distributed DP needs {honest} honest clients but the round samples {sampled}"
            )
        return honest


@dataclass(slots=True)
class SecAggRoundStats:
    """What one secure round did (no secrets, no individual values)."""

    server_round: int
    sampled: int
    degree: int
    threshold: int
    ring_bits: int
    quant_bits: int
    survivors: int = 0
    dropped: int = 0
    total_weight: int = 0
    upload_bytes_per_client: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    aborted: str | None = None
    dp: dict[str, float] | None = None
    # What each survivor was charged (distributed DP and shared-noise DP-SGD rounds).
    spend: PrivacySpend | None = None
    survivor_ids: list[int] = field(default_factory=list)
    survivor_subjects: list[str] = field(default_factory=list)
