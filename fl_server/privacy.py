"""The DP mode of a run on the server, and which amplification-by-sampling claim it may make.

:class:`ServerDp` says which mechanism a run uses and how it samples;
:class:`fl_server.dp_strategy.DifferentialPrivacy` wraps any Flower strategy
with it:

- **central**: the server sends each round's clip (``fedge.cdp``), averages
  the clipped updates *unweighted* and adds N(0, (z_u C)^2) to their sum from
  the CSPRNG; with adaptive clipping it moves C with the noisy sum of the
  clipped bits, which only a secure round can deliver (checked here);
- **local**: ``fedge.ldp``; the devices noise their own updates;
- **sample**: ``fedge.dpsgd``; the devices run DP-SGD and account their own
  Poisson batches (Opacus).

Sampling: ``poisson_sampling`` draws every node independently with
probability ``fraction_train`` from the OS CSPRNG and never publishes the
sample, instead of Flower's fixed-size ``random.sample``. Only that sampling,
by a server the deployment trusts (central DP), lets the run account with
amplification by sampling; :func:`amplification` says which claim holds and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from flwr.app import ConfigRecord

from fedge.errors import ConfigError
from strategies.central import (
    CDP_RECORD_KEY,
    LDP_RECORD_KEY,
    CentralDpRound,
    CentralDpSettings,
    LocalDpSettings,
)
from strategies.dp_mode import DpMode
from strategies.sample_dp import DPSGD_RECORD_KEY, SampleDpSettings

__all__ = ["Amplification", "PrivacyMechanism", "ServerDp", "amplification"]


class PrivacyMechanism(Enum):
    """The DP mechanism of a run, as the ledger and the reports name it."""

    CENTRAL = "central-gaussian"
    DISTRIBUTED = "distributed-ddg"
    LOCAL = "local-gaussian"
    SAMPLE = "dp-sgd"
    SAMPLE_DISTRIBUTED = "sample-ddg"

    @classmethod
    def of(cls, mode: DpMode) -> PrivacyMechanism:
        """Return the mechanism of a run's DP mode.

        Raises
        ------
        ConfigError
            For ``DpMode.OFF`` (no mechanism).
        """
        if mode is DpMode.OFF:
            raise ConfigError("a run without DP has no privacy mechanism")
        return _MECHANISM_OF[mode]


_MECHANISM_OF = {
    DpMode.CENTRAL: PrivacyMechanism.CENTRAL,
    DpMode.DISTRIBUTED: PrivacyMechanism.DISTRIBUTED,
    DpMode.LOCAL: PrivacyMechanism.LOCAL,
    DpMode.SAMPLE: PrivacyMechanism.SAMPLE,
    DpMode.SAMPLE_DISTRIBUTED: PrivacyMechanism.SAMPLE_DISTRIBUTED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerDp:
    """The DP mode of a run on the server (exactly one of the three settings).

    Parameters
    ----------
    central, local, sample
        The mechanism's settings.
    secure
        Rounds run under secure aggregation: each round's train replies are one
        aggregate that lists its participants (needed for adaptive clipping).
    poisson_sampling
        Sample nodes by independent CSPRNG coin flips (see :func:`amplification`).
    """

    central: CentralDpSettings | None = None
    local: LocalDpSettings | None = None
    sample: SampleDpSettings | None = None
    secure: bool = False
    poisson_sampling: bool = False

    def __post_init__(self) -> None:
        given = [s for s in (self.central, self.local, self.sample) if s is not None]
        if len(given) != 1:
            raise ConfigError("choose exactly one of central, local and sample-level DP")
        if self.central is not None and self.central.adaptive is not None and not self.secure:
            raise ConfigError(
                "adaptive clipping sums each client's clipped bit: it needs secure aggregation "
                "(add --secure-agg) so the bits are never sent in clear"
            )

    @property
    def mechanism(self) -> PrivacyMechanism:
        """Which mechanism this is."""
        if self.central is not None:
            return PrivacyMechanism.CENTRAL
        if self.local is not None:
            return PrivacyMechanism.LOCAL
        return PrivacyMechanism.SAMPLE

    def round_record(self, *, l2_clip: float) -> tuple[str, ConfigRecord]:
        """Return the key and the record that tell a device a round's DP parameters.

        ``l2_clip`` is the round's central clip (it moves with adaptive clipping);
        the other mechanisms ignore it.
        """
        if self.central is not None:
            central = CentralDpRound(
                l2_clip=l2_clip,
                noise_multiplier=self.central.noise_multiplier,
                adaptive=self.central.adaptive is not None,
            )
            return CDP_RECORD_KEY, ConfigRecord(dict(central.to_fields()))
        if self.local is not None:
            return LDP_RECORD_KEY, ConfigRecord(dict(self.local.to_fields()))
        assert self.sample is not None
        return DPSGD_RECORD_KEY, ConfigRecord(dict(self.sample.to_fields()))


@dataclass(frozen=True, slots=True)
class Amplification:
    """Whether a run may account with amplification by sampling, at which rate, and why.

    ``sample_rate`` is None where the rate is not the server's to know (DP-SGD
    amplifies by each device's own batch sampling).
    """

    claimed: bool
    sample_rate: float | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """Return the report's JSON form."""
        return {"claimed": self.claimed, "sample_rate": self.sample_rate, "reason": self.reason}


def amplification(
    mechanism: PrivacyMechanism, *, poisson_sampling: bool, fraction: float
) -> Amplification:
    """Return the amplification-by-sampling claim a run may make.

    Parameters
    ----------
    mechanism
        The run's DP mechanism.
    poisson_sampling
        Clients are drawn by independent CSPRNG coin flips (never published).
    fraction
        The client sampling fraction, in (0, 1].

    Returns
    -------
    Amplification
        The claim, its rate (None for DP-SGD: the device's own) and the reason.
    """
    if mechanism is PrivacyMechanism.DISTRIBUTED:
        return Amplification(
            False,
            1.0,
            "distributed DP defends against the server, and the server that samples knows "
            "who took part: no amplification; every round is accounted at sample rate 1",
        )
    if mechanism is PrivacyMechanism.SAMPLE_DISTRIBUTED:
        return Amplification(
            True,
            None,
            "shared-noise DP-SGD: each round is one subsampled Gaussian step at the rate each "
            "device samples its own examples with (its CSPRNG, never revealed); the server's "
            "choice of devices adds nothing",
        )
    if mechanism is PrivacyMechanism.LOCAL:
        return Amplification(
            False,
            1.0,
            "local DP protects each update on its own device; a device knows when it takes "
            "part, so its guarantee is accounted per participation at sample rate 1",
        )
    if mechanism is PrivacyMechanism.SAMPLE:
        # The client sampling fraction is not DP-SGD's rate: a device knows it was sampled,
        # so only its own Poisson batches (rate = batch size / its examples) amplify.
        return Amplification(
            True,
            None,
            "sample-level DP-SGD: Opacus amplifies by each device's own Poisson batch "
            "sampling rate, which only the device knows; client sampling adds nothing to a "
            "device's example-level guarantee",
        )
    if fraction >= 1:
        return Amplification(
            False, 1.0, "every client takes part in every round: nothing to amplify"
        )
    if not poisson_sampling:
        return Amplification(
            False,
            1.0,
            "clients are sampled by Flower's fixed-size random.sample, which is neither "
            "Poisson nor unpredictable: accounted at sample rate 1 (pass --poisson-sampling)",
        )
    return Amplification(
        True,
        fraction,
        f"clients are sampled independently with probability {fraction:g} by the OS CSPRNG "
        "on a server the deployment trusts (central DP) and the sample is never published: "
        "the subsampled Gaussian's amplification applies",
    )
