"""The device policy refuses exactly what is out of bounds, and what it accepts is safe."""

from __future__ import annotations

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fl_client.policy import DevicePolicy
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import PolicyViolation
from secure_agg.messages import RoundSetup
from secure_agg.params import ThreatModel, _tail_at_least, corrupt_count
from secure_agg.policy import ProtocolPolicy
from strategies.central import CentralDpRound

SIGMA = 40.0


def _setup(n: int, k: int, t: int, threat: ThreatModel, bits: int = 32) -> RoundSetup:
    return RoundSetup(
        round_id=b"r" * 16,
        node_id=1,
        participants=tuple(range(1, n + 1)),
        degree=k,
        threshold=t,
        encoding=EncodingConfig(clip_range=1.0, ring_bits=bits, max_clients=2),
        vector_length=10,
        threat_model=threat,
    )


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(2, 400),
    k_frac=st.floats(0.0, 1.0),
    t_frac=st.floats(0.0, 1.0),
    corrupt=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.33]),
    threat=st.sampled_from(list(ThreatModel)),
)
def test_an_accepted_threshold_keeps_every_device_safe_and_a_refused_one_would_not(
    n: int, k_frac: float, t_frac: float, corrupt: float, threat: ThreatModel
) -> None:
    k = max(1, round(k_frac * (n - 1)))
    t = max(1, round(t_frac * k))
    policy = ProtocolPolicy(
        threat_model=threat,
        authority_public_key=bytes(32) if threat is ThreatModel.ACTIVE else None,
        corrupt_fraction=corrupt,
        security_log2=SIGMA,
        min_degree=1,
        min_survivors=2,
    )
    # The probability that the holders a device draws include enough corrupt clients to
    # reconstruct (semi-honest: t of them; active: 2t - k, with the honest ones' one share).
    unsafe_from = t if threat is ThreatModel.SEMI_HONEST else 2 * t - k
    others = n - 1
    exposure = _tail_at_least(others, min(corrupt_count(n, corrupt), others), k, unsafe_from)
    try:
        policy.check_setup(_setup(n, k, t, threat))
    except PolicyViolation:
        accepted = False
    else:
        accepted = True
    if accepted:
        assert exposure <= 2.0**-SIGMA
    else:
        # Refused only when the least safe threshold is above t (or no threshold is safe).
        assert t < policy.least_threshold(n, k)


@settings(max_examples=200, deadline=None)
@given(
    clip=st.floats(1e-6, 1e6),
    z=st.floats(1e-6, 1e6),
    max_clip=st.floats(1e-3, 1e3),
    min_z=st.floats(1e-3, 1e3),
)
def test_dp_parameters_are_refused_exactly_outside_the_bounds(
    clip: float, z: float, max_clip: float, min_z: float
) -> None:
    assume(math.isfinite(clip) and math.isfinite(z))
    policy = DevicePolicy(protocol=None, max_l2_clip=max_clip, min_noise_multiplier=min_z)
    round_config = CentralDpRound(l2_clip=clip, noise_multiplier=z, adaptive=False)
    inside = clip <= max_clip and z >= min_z * (1 - 1e-9)
    try:
        policy.check_central(round_config)
    except PolicyViolation:
        assert not inside
    else:
        assert inside


@given(survivors=st.integers(0, 500), least=st.integers(2, 100), required=st.integers(0, 200))
def test_the_device_reveals_only_for_enough_survivors(
    survivors: int, least: int, required: int
) -> None:
    policy = ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, min_survivors=least)
    try:
        policy.check_survivors(survivors, required=required)
    except PolicyViolation:
        assert survivors < max(least, required)
    else:
        assert survivors >= max(least, required)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(3, 300),
    bits=st.sampled_from([8, 16, 32, 64]),
    allowed=st.sets(st.sampled_from([8, 16, 32, 64]), min_size=1),
    threat=st.sampled_from(list(ThreatModel)),
    mine=st.sampled_from(list(ThreatModel)),
)
def test_other_rings_and_threat_models_are_refused(
    n: int, bits: int, allowed: set[int], threat: ThreatModel, mine: ThreatModel
) -> None:
    policy = ProtocolPolicy(
        threat_model=mine,
        authority_public_key=bytes(32) if mine is ThreatModel.ACTIVE else None,
        ring_bits=frozenset(allowed),
        corrupt_fraction=0.0,
        min_degree=1,
    )
    k = n - 1
    setup = _setup(n, k, k, threat, bits)
    try:
        policy.check_setup(setup)
    except PolicyViolation:
        assert bits not in allowed or threat is not mine
    else:
        assert bits in allowed and threat is mine
