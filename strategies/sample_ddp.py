"""Sample-level DP that pays for its noise once: DP-SGD steps whose noise is shared by the devices.

DP-SGD on every device (:mod:`strategies.sample_dp`) adds the whole noise a
single curator would add to every device's update, so averaging n devices
leaves sqrt(n) times it. Here each round is one DP-SGD step over the union of
the devices' data (DP-FedSGD), and the noise is split as distributed DP splits
it (:mod:`strategies.ddp`):

1. every device Poisson-samples its own examples with rate q (its CSPRNG; the
   server never learns the sample), clips each example's gradient to C and sums
   them: s_i;
2. it scales the sum by the round's public ``step_scale`` kappa (minus the
   learning rate over the expected examples per device, so the server's mean is
   the model step), clips it to ``kappa * sum_clip`` (a projection: it moves no
   two sums further apart, so one example still moves it by at most kappa C),
   rotates it, scales it by 1/gamma, rounds it stochastically and adds its share
   N_Z(0, sigma^2) of discrete Gaussian noise, sized so the policy's fewest
   honest devices hold the whole noise z kappa C;
3. secure aggregation sums the integer vectors; the server decodes the mean.

Privacy of one example (add/remove one example of one device):

- *Sensitivity.* Fix the rounding's uniforms u (independent of the data):
  rounding x up where u < frac(x) is floor(x + 1 - u), so two sums that differ
  by delta in real units differ after rounding by at most |delta_j| + 1 per
  coordinate, and D2 <= kappa C / gamma + sqrt(d) in integer units (d the
  rotated length, the model's), D1 <= sqrt(d) kappa C / gamma + d. The output is a mixture
  over u of mechanisms with these sensitivities; Rényi divergence is jointly
  quasi-convex, so the mixture is at least as private as the worst u.
  Conditional rounding is *not* used: re-rounding on the norm of the whole sum
  would make the rounding depend on the other examples.
- *Noise.* The honest devices' shares sum to a discrete Gaussian of variance at
  least h sigma^2 up to Kairouz et al.'s tau (Theorem 1), which this module
  requires to be below 1e-12 (sigma is ~10^4-10^7 integer steps here; tau is
  exp(-pi^2 sigma^2) small). The discrete Gaussian's Rényi divergences between
  integer shifts are at most the continuous Gaussian's (Canonne, Kamath and
  Steinke 2020), and every term of the sampled Gaussian's moment at an integer
  order (Mironov et al. 2019) is a positive multiple of such a divergence, so
  the subsampled Gaussian analysis at multiplier z_acc = sqrt(h) sigma / D2 and
  rate q bounds each round. Each device charges itself exactly that event with
  its own policy's h (:meth:`fl_client.policy.DevicePolicy.sample_distributed_multiplier`).
- *Sampling.* Amplification holds because each device samples its examples with
  its own CSPRNG and never reveals the sample; the server's choice of devices
  is not counted (a device knows it was asked).

The ring must be wide: rounding adds sqrt(d) to D2, so kappa C / gamma must be
far above sqrt(d) (~338 for 114,410 parameters). At 32 bits it is ~10^7 and
rounding costs under 0.01 % of the noise; at 16 bits it would double it, so
:class:`SampleDdpSettings` asks for 32 bits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from secure_agg.noise import add_discrete_gaussian, uniform53
from secure_agg.randomness import RandomSource
from strategies.accounting import GaussianSteps, PrivacySpend, composed_epsilon, least_noise
from strategies.clipping import clip_l2
from strategies.ddp import DdpConfig
from strategies.records import check_noise_multiplier, checked_fields
from strategies.rotation import rotate, rotated_length

__all__ = [
    "SDDP_RECORD_KEY",
    "SHARED_NOISE_MECHANISM",
    "SampleDdpConfig",
    "SampleDdpSettings",
    "ddg_tau",
    "noise_for_budget",
    "sddp_encode",
]

SDDP_RECORD_KEY: Final = "fedge.sddp"
SHARED_NOISE_MECHANISM: Final = "sample-ddg"
"""The ledgers' name of the mechanism (both the server's and each device's)."""
_FIELDS: dict[str, type] = {
    "example-clip": float,
    "sample-rate": float,
    "step-scale": float,
    "sum-clip": float,
    "noise-std": float,
    "dimension": int,
    "expected-clients": int,
    "ring-bits": int,
    "rotation-seed": bytes,
}
_MIN_RING_BITS = 32
# Kairouz et al.'s tau (the sum of discrete Gaussians' distance from one) must vanish.
_MAX_TAU = 1e-12
_CALIBRATION_STEPS = 20


def ddg_tau(sigma: float, honest: int) -> float:
    """Return a bound on Kairouz et al.'s tau of ``honest`` discrete Gaussians of scale sigma.

    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)), and k / (k + 1) >= 1/2.
    """
    return 10 * max(honest - 1, 0) * math.exp(-(math.pi**2) * sigma * sigma)


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleDdpConfig:
    """One round's shared-noise DP-SGD step, the same for every device (``fedge.sddp``).

    Parameters
    ----------
    example_clip
        C, the L2 bound of one example's gradient.
    sample_rate
        q, each example's probability of being in the round's step.
    step_scale
        kappa: the device multiplies its clipped gradient sum by it (nonzero).
    sum_clip
        The L2 bound of the device's clipped sum before scaling (>= C).
    noise_std
        Each device's noise standard deviation, in the scaled (real) units.
    dimension, expected_clients, ring_bits, rotation_seed
        As in :class:`strategies.ddp.DdpConfig` (the ring, the rotation).
    """

    example_clip: float
    sample_rate: float
    step_scale: float
    sum_clip: float
    noise_std: float
    dimension: int
    expected_clients: int
    ring_bits: int = 32
    rotation_seed: bytes

    def __post_init__(self) -> None:
        for name in ("example_clip", "sum_clip", "noise_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not (math.isfinite(self.step_scale) and self.step_scale != 0):
            raise ConfigError(f"step_scale must be a finite nonzero number, got {self.step_scale}")
        if self.sum_clip < self.example_clip:
            raise ConfigError("sum_clip must be at least example_clip")
        if self.ring_bits < _MIN_RING_BITS:
            raise ConfigError(
                f"shared-noise DP-SGD needs a 32- or 64-bit ring (rounding would cost more "
                f"noise than the signal allows at {self.ring_bits} bits)"
            )
        self.ring  # validates the ring: the sum fits, sigma in range  # noqa: B018

    @property
    def ring(self) -> DdpConfig:
        """The ring and rotation (a :class:`DdpConfig` whose clip is the scaled sum's bound)."""
        return DdpConfig(
            l2_clip=abs(self.step_scale) * self.sum_clip,
            noise_std=self.noise_std,
            dimension=self.dimension,
            expected_clients=self.expected_clients,
            ring_bits=self.ring_bits,
            rotation_seed=self.rotation_seed,
        )

    @property
    def l2_sensitivity(self) -> float:
        """D2: how far one example moves a device's integer vector (module notes)."""
        ring = self.ring
        return abs(self.step_scale) * self.example_clip / ring.gamma + math.sqrt(
            rotated_length(self.dimension)
        )

    def multiplier(self, honest: int) -> float:
        """Return z_acc = sqrt(honest) sigma / D2: the accounted noise multiplier of a round.

        Raises
        ------
        ConfigError
            If ``honest`` < 1 or the honest shares' tau is not negligible.
        """
        if honest < 1:
            raise ConfigError(f"honest must be >= 1, got {honest}")
        sigma = self.ring.sigma_integer
        if ddg_tau(sigma, honest) > _MAX_TAU:
            raise ConfigError(
                f"each device's noise is {sigma:.3g} integer steps: too coarse for the "
                "Gaussian analysis; widen the ring"
            )
        return math.sqrt(honest) * sigma / self.l2_sensitivity

    def spend(self, honest: int) -> PrivacySpend:
        """Return what one round costs an example: the subsampled Gaussian at ``honest``.

        Raises
        ------
        ConfigError
            As :meth:`multiplier`.
        """
        event = GaussianSteps(
            noise_multiplier=self.multiplier(honest), sample_rate=self.sample_rate, steps=1
        )
        return PrivacySpend(mechanism=SHARED_NOISE_MECHANISM, gaussian=event)

    def to_fields(self) -> dict[str, float | int | bytes]:
        """Return the config as flat fields (a Flower ConfigRecord's content)."""
        return {
            "example-clip": self.example_clip,
            "sample-rate": self.sample_rate,
            "step-scale": self.step_scale,
            "sum-clip": self.sum_clip,
            "noise-std": self.noise_std,
            "dimension": self.dimension,
            "expected-clients": self.expected_clients,
            "ring-bits": self.ring_bits,
            "rotation-seed": self.rotation_seed,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> SampleDdpConfig:
        """Validate flat fields from the network and return the config.

        Raises
        ------
        ConfigError
            If a field is missing, of the wrong type or out of range.
        """
        values = checked_fields(fields, _FIELDS, what="shared-noise DP-SGD")
        return cls(
            example_clip=cast(float, values["example-clip"]),
            sample_rate=cast(float, values["sample-rate"]),
            step_scale=cast(float, values["step-scale"]),
            sum_clip=cast(float, values["sum-clip"]),
            noise_std=cast(float, values["noise-std"]),
            dimension=cast(int, values["dimension"]),
            expected_clients=cast(int, values["expected-clients"]),
            ring_bits=cast(int, values["ring-bits"]),
            rotation_seed=cast(bytes, values["rotation-seed"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleDdpSettings:
    """What a run asks of shared-noise DP-SGD; each round derives a :class:`SampleDdpConfig`.

    Parameters
    ----------
    example_clip
        C, each example's gradient bound.
    noise_multiplier
        z: the noise in the sum is z kappa C when the fewest honest devices add theirs.
    sample_rate
        q, each example's probability of being in a round's step.
    learning_rate
        The step: the server's mean is ``-learning_rate`` times the clipped gradient sum
        over ``expected_batch`` examples a device.
    expected_batch
        The examples a device is expected to sample (q times a device's examples; public).
    sum_clip_factor
        A device's clipped sum is bounded by this many examples' clips times the expected
        batch (a bound for the ring; clipping the sum never weakens privacy).
    ring_bits
        32 (see :meth:`__post_init__`).
    min_honest_contributors
        As in :class:`strategies.ddp.DistributedDpSettings`.
    """

    example_clip: float
    noise_multiplier: float
    sample_rate: float
    learning_rate: float
    expected_batch: float
    sum_clip_factor: float = 2.0
    ring_bits: int = 32
    min_honest_contributors: int | None = None

    def __post_init__(self) -> None:
        for name in ("example_clip", "learning_rate", "expected_batch", "sum_clip_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        check_noise_multiplier(self.noise_multiplier)
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        honest = self.min_honest_contributors
        if honest is not None and honest < 1:
            raise ConfigError(f"min_honest_contributors must be >= 1, got {honest}")
        if self.ring_bits != _MIN_RING_BITS:
            # 16 bits: rounding would double the sensitivity; 64: the scale would put each
            # share past the discrete Gaussian sampler's 2^50 integer steps.
            raise ConfigError(f"shared-noise DP-SGD needs ring_bits 32, got {self.ring_bits}")

    def for_round(
        self, *, dimension: int, sampled: int, min_honest: int, rotation_seed: bytes
    ) -> SampleDdpConfig:
        """Size each device's share so ``min_honest`` honest devices give multiplier z.

        z is the *accounted* multiplier (:meth:`SampleDdpConfig.multiplier`): the
        rounding's share of the sensitivity is paid for with a little more noise.

        Raises
        ------
        ConfigError
            If ``min_honest`` is out of range or the ring cannot hold the round.
        """
        if not 1 <= min_honest <= sampled:
            raise ConfigError(f"min_honest must be in [1, {sampled}], got {min_honest}")
        kappa = -self.learning_rate / self.expected_batch
        noise_std = self.noise_multiplier * abs(kappa) * self.example_clip / math.sqrt(min_honest)
        for _ in range(_CALIBRATION_STEPS):
            config = SampleDdpConfig(
                example_clip=self.example_clip,
                sample_rate=self.sample_rate,
                step_scale=kappa,
                sum_clip=self.example_clip * max(1.0, self.sum_clip_factor * self.expected_batch),
                noise_std=noise_std,
                dimension=dimension,
                expected_clients=sampled,
                ring_bits=self.ring_bits,
                rotation_seed=rotation_seed,
            )
            reached = config.multiplier(min_honest)
            if reached >= self.noise_multiplier:
                return config
            # A little over the ratio: the scale grows with the noise, so aim past it.
            noise_std *= (self.noise_multiplier / reached) * (1 + 1e-9)
        raise ConfigError(  # pragma: no cover - the ratio is within 1e-4 of 1 at 32 bits
            "could not size the noise shares for this ring; widen it"
        )


def noise_for_budget(
    *, target_epsilon: float, delta: float, sample_rate: float, rounds: int
) -> float:
    """Return the smallest accounted multiplier whose ``rounds`` steps stay within the target.

    The same analysis the ledgers charge (the subsampled Gaussian's RDP on
    :func:`strategies.accounting.composed_epsilon`'s orders), by bisection to 0.1 %.

    Raises
    ------
    ConfigError
        If the target is out of range or needs a multiplier above 10^4.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")

    def epsilon(z: float) -> float:
        event = GaussianSteps(noise_multiplier=z, sample_rate=sample_rate, steps=rounds)
        with warnings.catch_warnings():
            # Opacus warns when the probe's best order is at the grid's end; the bound holds.
            warnings.simplefilter("ignore", UserWarning)
            return composed_epsilon(gaussian=[event], delta=delta)

    z = least_noise(epsilon, target_epsilon, low=0.3, high=1e4)
    if z is None:
        raise ConfigError(
            f"epsilon {target_epsilon:g} over {rounds} rounds at sample rate {sample_rate:g} "
            "needs more noise than any useful step; lower the rounds or the sample rate"
        )
    return z


def sddp_encode(
    gradient_sum: npt.NDArray[np.floating], config: SampleDdpConfig, rng: RandomSource
) -> npt.NDArray[np.unsignedinteger]:
    """Scale, clip, rotate, round stochastically (unconditioned), add the noise share, mod 2^b.

    ``gradient_sum`` is the device's sum of per-example gradients, each clipped to
    ``config.example_clip``.

    Raises
    ------
    ConfigError
        If the vector has the wrong length or holds NaN or infinity.
    """
    flat = np.asarray(gradient_sum, dtype=np.float64).reshape(-1)
    if flat.shape[0] != config.dimension:
        raise ConfigError(f"the update has {flat.shape[0]} values, expected {config.dimension}")
    ring = config.ring
    clipped = clip_l2(flat * config.step_scale, ring.l2_clip).update
    scaled = np.multiply(rotate(clipped, ring.rotation_seed), 1.0 / ring.gamma, dtype=np.float64)
    base = np.floor(scaled)
    rounded = base + (uniform53(rng, scaled.shape[0]) < scaled - base)
    integers: npt.NDArray[np.int64] = rounded.astype(np.int64)
    add_discrete_gaussian(integers, ring.sigma_integer, rng)
    # Two's complement modulo 2^b (numpy's integer casts keep the low b bits).
    return integers.astype(ring.dtype)
