"""A neighbour's certificate as a device checks it: pinned authority, own clock, own revocations."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedge.errors import ConfigError
from secure_agg import wire
from secure_agg.client import ClientSession, ClientStage
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import CryptoError, InvalidMessage
from secure_agg.identity import EnrolmentAuthority, IdentityCertificate, NodeIdentity
from secure_agg.messages import KeyAdvertisement, ShareKeysRequest
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from secure_agg.server import ServerSession

EXPIRY = 1_800_000_000
BEFORE, AFTER = EXPIRY - 60, EXPIRY
AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(5))
NODES = [11, 22, 33, 44]
ENCODING = EncodingConfig(clip_range=0.5, ring_bits=32, max_clients=4, weight_cap=10)


def _policy(**overrides: object) -> ProtocolPolicy:
    values: dict[str, object] = {
        "threat_model": ThreatModel.ACTIVE,
        "authority_public_key": AUTHORITY.public_key,
        "corrupt_fraction": 0.0,
        "min_degree": 1,
    }
    values.update(overrides)
    return ProtocolPolicy(**values)  # type: ignore[arg-type]


def _certificate(expires_at: int | None = EXPIRY, name: str = "dev-1") -> IdentityCertificate:
    identity = AUTHORITY.enrol(name, DeterministicRandom(8), expires_at=expires_at)
    return identity.certificate


# --- ProtocolPolicy.check_certificate --------------------------------------------------


def test_a_valid_certificate_passes() -> None:
    _policy().check_certificate(_certificate(), now=BEFORE, revoked=frozenset({"dev-2"}))
    _policy().check_certificate(_certificate(None), now=None)


@pytest.mark.parametrize(
    ("certificate", "now", "revoked"),
    [
        (None, BEFORE, frozenset()),
        (_certificate(), AFTER, frozenset()),
        (_certificate(), AFTER + 1, frozenset()),
        (_certificate(), None, frozenset()),
        (_certificate(), BEFORE, frozenset({"dev-1"})),
        (_certificate(None), BEFORE, frozenset({"dev-1"})),
        (replace(_certificate(), expires_at=EXPIRY + 10**6), BEFORE, frozenset()),
        (
            EnrolmentAuthority.generate(DeterministicRandom(6))
            .enrol("dev-1", DeterministicRandom(8), expires_at=EXPIRY)
            .certificate,
            BEFORE,
            frozenset(),
        ),
    ],
    ids=[
        "missing",
        "expired",
        "long-expired",
        "expiring-without-clock",
        "revoked",
        "revoked-without-expiry",
        "expiry-extended",
        "other-authority",
    ],
)
def test_an_unacceptable_certificate_fails_opaquely(
    certificate: IdentityCertificate | None, now: int | None, revoked: frozenset[str]
) -> None:
    with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
        _policy().check_certificate(certificate, now=now, revoked=revoked)


def test_a_policy_may_require_an_expiry() -> None:
    policy = _policy(require_certificate_expiry=True)

    policy.check_certificate(_certificate(), now=BEFORE)
    with pytest.raises(CryptoError):
        policy.check_certificate(_certificate(None), now=BEFORE)


def test_requiring_an_expiry_needs_an_authority() -> None:
    with pytest.raises(ConfigError, match="require_certificate_expiry needs"):
        ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, require_certificate_expiry=True)


def test_checking_a_certificate_needs_an_authority() -> None:
    policy = ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST)

    with pytest.raises(ConfigError, match="needs the enrolment authority's key"):
        policy.check_certificate(_certificate(), now=BEFORE)


def test_the_clock_must_be_integer_seconds() -> None:
    with pytest.raises(ConfigError, match="now must be an integer of Unix seconds"):
        _policy().check_certificate(_certificate(), now=float(BEFORE))  # type: ignore[arg-type]


# --- ClientSession.share_keys ----------------------------------------------------------


def _round(
    expiries: dict[int, int | None],
) -> tuple[dict[int, ClientSession], dict[int, ShareKeysRequest], dict[int, NodeIdentity]]:
    rng = DeterministicRandom(3)
    identities = {
        n: AUTHORITY.enrol(f"dev-{n}", rng, expires_at=expiries.get(n, EXPIRY)) for n in NODES
    }
    server = ServerSession(
        NODES,
        degree=3,
        threshold=2,
        encoding=ENCODING,
        vector_length=5,
        threat_model=ThreatModel.ACTIVE,
        rng=rng,
        authority_public_key=AUTHORITY.public_key,
    )
    sessions = {
        n: ClientSession(
            setup, policy=_policy(), rng=DeterministicRandom(n), identity=identities[n]
        )
        for n, setup in server.setups().items()
    }
    requests = server.receive_adverts({n: s.advertise() for n, s in sessions.items()})
    return sessions, requests, identities


def test_neighbours_with_valid_certificates_get_shares() -> None:
    sessions, requests, _ = _round({})

    shares = sessions[11].share_keys(requests[11], now=BEFORE, revoked=frozenset({"dev-99"}))

    assert set(shares.ciphertexts) == set(sessions[11].holders)
    assert sessions[11].stage is ClientStage.SHARED


def test_a_revoked_neighbour_is_refused_before_any_share() -> None:
    sessions, requests, identities = _round({})

    with pytest.raises(CryptoError):
        sessions[11].share_keys(
            requests[11], now=BEFORE, revoked={identities[22].certificate.enrolment_id}
        )
    assert sessions[11].stage is ClientStage.ADVERTISED


def test_an_expired_neighbour_is_refused_before_any_share() -> None:
    sessions, requests, _ = _round({33: BEFORE - 1})

    with pytest.raises(CryptoError):
        sessions[11].share_keys(requests[11], now=BEFORE)
    assert sessions[11].stage is ClientStage.ADVERTISED


def test_a_device_without_a_clock_refuses_expiring_neighbours() -> None:
    sessions, requests, _ = _round({})

    with pytest.raises(CryptoError):
        sessions[11].share_keys(requests[11])


def test_neighbours_without_expiry_pass_without_a_clock() -> None:
    sessions, requests, _ = _round(dict.fromkeys(NODES))

    shares = sessions[11].share_keys(requests[11])

    assert shares.ciphertexts


def test_the_devices_own_revocation_does_not_stop_it_checking_others() -> None:
    # Revocation is of neighbours: a device does not refuse itself (its neighbours will).
    sessions, requests, identities = _round({})

    sessions[11].share_keys(
        requests[11], now=BEFORE, revoked={identities[11].certificate.enrolment_id}
    )


# --- the wire carries the expiry -------------------------------------------------------


def _advert(certificate: IdentityCertificate) -> KeyAdvertisement:
    return KeyAdvertisement(
        node_id=3,
        enc_public=b"e" * 32,
        mask_public=b"m" * 32,
        self_mask_commitment=b"c" * 32,
        holders=(1, 9),
        setup_digest=b"d" * 32,
        certificate=certificate,
        signature=b"s" * 64,
    )


@pytest.mark.parametrize("expires_at", [None, 1, EXPIRY, (1 << 63) - 1])
def test_a_certificate_round_trips_through_the_wire(expires_at: int | None) -> None:
    advert = _advert(_certificate(expires_at))

    decoded = wire.decode(wire.encode(advert), KeyAdvertisement)

    assert decoded == advert
    assert decoded.certificate is not None
    assert decoded.certificate.expires_at == expires_at


def test_the_wire_refuses_an_expiry_out_of_range() -> None:
    encoded = wire.encode(_advert(_certificate(EXPIRY)))
    expiry = EXPIRY.to_bytes(8, "big")
    assert encoded.count(expiry) == 1

    for bad in (0, 1 << 63):
        with pytest.raises(InvalidMessage, match="certificate expiry"):
            wire.decode(encoded.replace(expiry, bad.to_bytes(8, "big")), KeyAdvertisement)


def test_the_wire_refuses_an_unknown_certificate_flag() -> None:
    encoded = wire.encode(_advert(_certificate(EXPIRY)))
    flag_at = encoded.index(b"d" * 32) + 32
    assert encoded[flag_at] == 2

    with pytest.raises(InvalidMessage, match="invalid certificate flag"):
        wire.decode(encoded[:flag_at] + b"\x03" + encoded[flag_at + 1 :], KeyAdvertisement)


def test_a_restored_session_keeps_its_neighbours_expiring_certificates() -> None:
    sessions, requests, identities = _round({})
    sessions[11].share_keys(requests[11], now=BEFORE)

    restored = ClientSession.restore(
        sessions[11].export_state(),
        policy=_policy(),
        rng=DeterministicRandom(1),
        identity=identities[11],
    )

    assert restored.stage is ClientStage.SHARED
    assert {a.certificate.expires_at for a in restored._adverts.values() if a.certificate} == {
        EXPIRY
    }
