"""The device policy: what a device accepts from any server, fixed on the device.

fedge names the server as the adversary. A device acts only on parameters it
can check against its own :class:`DevicePolicy`, installed at enrolment (the
deployment ships it; a simulation builds one per device) and never taken from
a server message:

- the secure-aggregation part (:class:`secure_agg.policy.ProtocolPolicy`): the
  pinned enrolment authority and threat model, ring widths, the least k, the
  threshold rule, the fewest survivors it unmasks for;
- bounds on every DP parameter a round may carry: the largest clip and the
  smallest noise multiplier (for distributed DP, the multiplier that the noise
  of the policy's fewest honest contributors gives);
- for distributed DP, the fewest honest contributors and (through the
  protocol part) the corrupt fraction it assumes: it refuses to unmask unless
  the survivors hold that many honest clients, and its ledger charges the rho
  of exactly that many, so the recorded number is the worst case its policy
  allows, whatever the server announces;
- its lifetime privacy budget (:class:`fl_client.budget.ClientBudget` enforces it).

A round outside the policy is refused before anything is revealed, with a
:class:`PolicyViolation` naming the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedge.errors import ConfigError
from secure_agg.errors import PolicyViolation
from secure_agg.policy import ProtocolPolicy
from strategies.central import CentralDpRound, LocalDpSettings
from strategies.ddp import DdpConfig
from strategies.records import check_noise_multiplier
from strategies.sample_ddp import SampleDdpConfig
from strategies.sample_dp import SampleDpSettings

__all__ = ["DevicePolicy", "PolicyViolation"]

# Multipliers are compared with a relative slack: a server that sizes the noise of
# the same contributors computes the same number through another float path.
_SLACK = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicePolicy:
    """What a device accepts (see the module docstring).

    Parameters
    ----------
    protocol
        The secure-aggregation policy; ``None``: the device takes part in no
        secure round (and so in no distributed-DP round).
    max_l2_clip
        The largest L2 clip (or DP-SGD per-example norm) a round may set.
    min_noise_multiplier
        The smallest noise multiplier a DP round may carry.
    min_honest_contributors
        Distributed DP: the fewest honest clients whose noise the device counts on.
    lifetime_epsilon
        The device's privacy budget over its whole life (``None``: no limit), at ``delta``.
    delta
        The delta every epsilon of the device is stated at, in (0, 1).
    """

    protocol: ProtocolPolicy | None
    max_l2_clip: float = 10.0
    min_noise_multiplier: float = 0.5
    min_honest_contributors: int = 2
    lifetime_epsilon: float | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_l2_clip) and self.max_l2_clip > 0):
            raise ConfigError(f"max_l2_clip must be a finite number > 0, got {self.max_l2_clip}")
        check_noise_multiplier(self.min_noise_multiplier, "min_noise_multiplier")
        if self.min_honest_contributors < 1:
            raise ConfigError(
                f"min_honest_contributors must be >= 1, got {self.min_honest_contributors}"
            )
        epsilon = self.lifetime_epsilon
        if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"lifetime_epsilon must be a finite number > 0, got {epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")

    def secure_protocol(self) -> ProtocolPolicy:
        """Return the secure-aggregation policy.

        Raises
        ------
        ConfigError
            If this device takes part in no secure round.
        """
        if self.protocol is None:
            raise ConfigError("this device's policy allows no secure aggregation")
        return self.protocol

    def _check_clip(self, what: str, clip: float) -> None:
        if clip > self.max_l2_clip:
            raise PolicyViolation(
                f"{what}: clip {clip:g} exceeds the device policy's {self.max_l2_clip:g}"
            )

    def _check_noise(self, what: str, multiplier: float) -> None:
        if multiplier < self.min_noise_multiplier * (1 - _SLACK):
            raise PolicyViolation(
                f"{what}: noise multiplier {multiplier:.4g} is below the device policy's "
                f"{self.min_noise_multiplier:g}"
            )

    def check_central(self, round_config: CentralDpRound) -> None:
        """Refuse a central-DP round outside the bounds."""
        self._check_clip("central DP", round_config.l2_clip)
        self._check_noise("central DP", round_config.noise_multiplier)

    def check_local(self, settings: LocalDpSettings) -> None:
        """Refuse a local-DP round outside the bounds."""
        self._check_clip("local DP", settings.l2_clip)
        self._check_noise("local DP", settings.noise_multiplier)

    def check_sample(self, settings: SampleDpSettings) -> None:
        """Refuse a DP-SGD round outside the bounds (a fixed noise multiplier is checked)."""
        self._check_clip("DP-SGD", settings.max_grad_norm)
        if settings.noise_multiplier > 0:
            self._check_noise("DP-SGD", settings.noise_multiplier)

    def check_sample_noise(self, multiplier: float) -> None:
        """Refuse DP-SGD noise below the floor, however it was chosen.

        :meth:`check_sample` checks a noise multiplier the round fixes; a round
        that names a target epsilon instead lets the device derive its noise, and
        that noise must meet the same floor before anything trains.
        """
        self._check_noise("DP-SGD", multiplier)

    def check_distributed(self, config: DdpConfig) -> None:
        """Refuse a distributed-DP round whose noise, over the fewest honest clients, is too small.

        The multiplier the device sees is noise_std * sqrt(h) / clip with h
        its ``min_honest_contributors``: colluding clients' noise is subtractable
        by the server, so it never counts.
        """
        self._check_clip("distributed DP", config.l2_clip)
        multiplier = config.noise_std * math.sqrt(self.min_honest_contributors) / config.l2_clip
        self._check_noise("distributed DP", multiplier)

    def distributed_rho(self, config: DdpConfig) -> float:
        """Return rho of one distributed-DP round with only the policy's fewest honest clients.

        Raises
        ------
        PolicyViolation
            If the round's integer noise scale is below 1/2 (outside the bound's validity).
        """
        try:
            return config.rho(self.min_honest_contributors)
        except ConfigError as exc:
            raise PolicyViolation(f"distributed DP: {exc}") from exc

    def check_sample_distributed(self, config: SampleDdpConfig) -> None:
        """Refuse a shared-noise DP-SGD round whose noise, over the fewest honest devices, is small.

        The multiplier checked is the accounted one (:meth:`sample_distributed_multiplier`):
        the noise of the policy's fewest honest devices over one example's sensitivity,
        rounding included.
        """
        self._check_clip("shared-noise DP-SGD", config.example_clip)
        self._check_noise("shared-noise DP-SGD", self.sample_distributed_multiplier(config))

    def sample_distributed_multiplier(self, config: SampleDdpConfig) -> float:
        """Return the noise multiplier a shared-noise DP-SGD round is charged at.

        Only the policy's fewest honest devices count, whatever the server sized the
        shares for; the device charges the subsampled Gaussian at this multiplier and
        the round's (its own) sample rate.

        Raises
        ------
        PolicyViolation
            If the noise is too coarse for the Gaussian analysis.
        """
        try:
            return config.multiplier(self.min_honest_contributors)
        except ConfigError as exc:
            raise PolicyViolation(f"shared-noise DP-SGD: {exc}") from exc

    def required_survivors(self, num_participants: int) -> int:
        """Return the survivors a distributed-DP round needs: the honest minimum + the corrupt."""
        protocol = self.secure_protocol()
        return self.min_honest_contributors + protocol.corrupt_bound(num_participants)
