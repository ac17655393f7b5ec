from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secure_agg.crypto import (
    AgreementKeyPair,
    KeyPurpose,
    derive_pair_key,
    open_sealed,
    seal,
    sign,
    signing_key_from_seed,
    verify_signature,
)
from secure_agg.errors import CryptoError, ProtocolAbort
from secure_agg.graph import choose_holders, neighbours_of, secure_shuffle
from secure_agg.identity import EnrolmentAuthority
from secure_agg.prg import add_mask, apply_masks, expand_mask, uniform_floats
from secure_agg.randomness import DeterministicRandom, SystemRandomSource
from secure_agg.shamir import (
    CHUNKS_PER_SECRET,
    PRIME,
    combine,
    lagrange_at_zero,
    split,
    uniform_field_elements,
)

SEED = bytes(range(32))


def test_mask_is_the_aes_256_ctr_keystream() -> None:
    expected = Cipher(algorithms.AES(SEED), modes.CTR(bytes(16))).encryptor().update(bytes(64))

    mask = expand_mask(SEED, 16, np.dtype(np.uint32))

    assert mask.tobytes() == expected


def test_masks_differ_per_seed_and_add_then_subtract_cancels() -> None:
    other = bytes(32)
    target = np.arange(1000, dtype=np.uint32)

    add_mask(target, SEED)
    assert not np.array_equal(target, np.arange(1000, dtype=np.uint32))
    add_mask(target, SEED, subtract=True)

    np.testing.assert_array_equal(target, np.arange(1000, dtype=np.uint32))
    assert not np.array_equal(
        expand_mask(SEED, 8, np.dtype(np.uint32)), expand_mask(other, 8, np.dtype(np.uint32))
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("length", [0, 1, 7, 65_535, 65_536, 65_537, 200_003])
def test_fused_masks_equal_one_mask_at_a_time(dtype: type, length: int) -> None:
    seeds = [(bytes([i]) * 32, i % 3 == 0) for i in range(5)]
    start: np.ndarray = np.arange(length, dtype=dtype)
    one_by_one, fused = start.copy(), start.copy()

    for seed, subtract in seeds:
        add_mask(one_by_one, seed, subtract=subtract)
    apply_masks(fused, seeds)

    np.testing.assert_array_equal(fused, one_by_one)
    if length:
        assert not np.array_equal(fused, start)


def test_mask_seed_length_is_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes, got 16"):
        expand_mask(bytes(16), 4, np.dtype(np.uint32))
    with pytest.raises(ValueError, match="32 bytes, got 8"):
        apply_masks(np.zeros(4, np.uint32), [(SEED, False), (bytes(8), True)])


def test_uniform_floats_lie_in_unit_interval_with_the_right_mean() -> None:
    values = uniform_floats(SEED, 100_000)

    assert values.min() >= 0.0
    assert values.max() < 1.0
    assert abs(values.mean() - 0.5) < 0.01


def test_masks_pass_a_chi_square_uniformity_test() -> None:
    words = expand_mask(SEED, 256_000, np.dtype(np.uint32))
    counts = np.bincount((words & 0xFF).astype(np.int64), minlength=256)
    expected = len(words) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())

    # 255 degrees of freedom: the 0.1% and 99.9% quantiles are about 196 and 330.
    assert 196 < chi2 < 330


@pytest.mark.parametrize(("threshold", "num_shares"), [(1, 1), (2, 3), (3, 5), (4, 4)])
def test_any_threshold_shares_reconstruct(threshold: int, num_shares: int) -> None:
    rng = DeterministicRandom(7)
    secrets = [rng.random_bytes(32), rng.random_bytes(32)]
    shares = split(secrets, threshold=threshold, num_shares=num_shares, rng=rng)

    assert shares.shape == (num_shares, 2 * CHUNKS_PER_SECRET)
    for holders in itertools.combinations(range(num_shares), threshold):
        xs = [h + 1 for h in holders]
        assert combine(xs, shares[list(holders)], num_secrets=2) == secrets


def test_fewer_than_threshold_shares_do_not_reconstruct() -> None:
    rng = DeterministicRandom(8)
    secrets = [rng.random_bytes(32)]
    shares = split(secrets, threshold=3, num_shares=5, rng=rng)

    assert combine([1, 2], shares[:2], num_secrets=1) != secrets


def test_a_corrupted_share_changes_or_invalidates_the_result() -> None:
    rng = DeterministicRandom(9)
    secrets = [rng.random_bytes(32)]
    shares = split(secrets, threshold=2, num_shares=3, rng=rng).copy()
    shares[0, 3] = (int(shares[0, 3]) + 1) % PRIME

    assert combine([1, 2], shares[:2], num_secrets=1) != secrets
    shares[0, 0] = PRIME  # outside the field
    assert combine([1, 2], shares[:2], num_secrets=1) is None


def test_lagrange_coefficients_sum_to_one_and_need_distinct_points() -> None:
    assert sum(lagrange_at_zero([1, 2, 3, 4])) % PRIME == 1
    with pytest.raises(ValueError, match="distinct"):
        lagrange_at_zero([1, 1])


def test_split_validates_its_arguments() -> None:
    rng = DeterministicRandom(1)
    with pytest.raises(ValueError, match="threshold"):
        split([bytes(32)], threshold=4, num_shares=3, rng=rng)
    with pytest.raises(ValueError, match="32 bytes"):
        split([bytes(31)], threshold=1, num_shares=2, rng=rng)


def test_pair_keys_agree_and_are_bound_to_purpose_round_and_pair() -> None:
    rng = DeterministicRandom(2)
    alice, bob, carol = (AgreementKeyPair.generate(rng) for _ in range(3))
    common = {"purpose": KeyPurpose.PAIRWISE_MASK, "round_id": b"r1", "node_a": 1, "node_b": 2}

    key_ab = derive_pair_key(alice.private, bob.public, **common)  # type: ignore[arg-type]
    key_ba = derive_pair_key(bob.private, alice.public, **common)  # type: ignore[arg-type]

    assert key_ab == key_ba
    assert len(key_ab) == 32
    assert key_ab != derive_pair_key(
        alice.private,
        bob.public,
        purpose=KeyPurpose.SHARE_ENCRYPTION,
        round_id=b"r1",
        node_a=1,
        node_b=2,
    )
    assert key_ab != derive_pair_key(
        alice.private,
        bob.public,
        purpose=KeyPurpose.PAIRWISE_MASK,
        round_id=b"r2",
        node_a=1,
        node_b=2,
    )
    assert key_ab != derive_pair_key(alice.private, carol.public, **common)  # type: ignore[arg-type]


def test_small_order_public_key_is_refused() -> None:
    pair = AgreementKeyPair.generate(DeterministicRandom(3))
    with pytest.raises(CryptoError):
        derive_pair_key(
            pair.private,
            bytes(32),
            purpose=KeyPurpose.PAIRWISE_MASK,
            round_id=b"r",
            node_a=1,
            node_b=2,
        )


def test_sealed_shares_open_only_with_the_same_key_and_context() -> None:
    rng = SystemRandomSource()
    key = rng.random_bytes(32)
    sealed = seal(key, b"share", b"round-1|1->2", rng)

    assert open_sealed(key, sealed, b"round-1|1->2") == b"share"
    for bad_key, bad_ad, bad_blob in (
        (rng.random_bytes(32), b"round-1|1->2", sealed),
        (key, b"round-2|1->2", sealed),
        (key, b"round-1|1->2", sealed[:-1] + bytes([sealed[-1] ^ 1])),
        (key, b"round-1|1->2", sealed[:10]),
    ):
        with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
            open_sealed(bad_key, bad_blob, bad_ad)


def test_signatures_verify_and_forgeries_fail_opaquely() -> None:
    seed = DeterministicRandom(4).random_bytes(32)
    public = signing_key_from_seed(seed).public_key().public_bytes_raw()
    signature = sign(seed, b"advert")

    verify_signature(public, signature, b"advert")
    with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
        verify_signature(public, signature, b"advert2")


def test_certificates_from_the_authority_verify_and_others_do_not() -> None:
    rng = DeterministicRandom(5)
    authority, impostor = EnrolmentAuthority.generate(rng), EnrolmentAuthority.generate(rng)
    identity = authority.enrol("device-17", rng)
    forged = impostor.enrol("device-17", rng)

    identity.certificate.verify(authority.public_key)
    verify_signature(identity.certificate.public_key, identity.sign(b"m"), b"m")
    with pytest.raises(CryptoError):
        forged.certificate.verify(authority.public_key)
    with pytest.raises(ValueError, match="enrolment ids"):
        authority.enrol("", rng)


def test_each_client_draws_its_own_holders_uniformly() -> None:
    nodes = list(range(100, 130))
    first = choose_holders(nodes, 105, 6, DeterministicRandom(6))
    other = choose_holders(nodes, 105, 6, DeterministicRandom(7))

    assert len(first) == 6 and len(set(first)) == 6 and 105 not in first
    assert set(first) <= set(nodes) and list(first) == sorted(first)
    assert first != other
    # Uniform over the 29 others: each is drawn with probability 6/29.
    counts = dict.fromkeys(nodes, 0)
    for seed in range(2000):
        for holder in choose_holders(nodes, 105, 6, DeterministicRandom(seed)):
            counts[holder] += 1
    drawn = [counts[n] for n in nodes if n != 105]
    expected = 2000 * 6 / 29
    assert all(abs(c - expected) < 5 * (expected * (1 - 6 / 29)) ** 0.5 for c in drawn)


def test_degree_n_minus_one_draws_everybody_and_neighbours_are_symmetric() -> None:
    assert choose_holders([1, 2, 3, 4], 1, 3, DeterministicRandom(1)) == (2, 3, 4)
    graph = neighbours_of({1: (2,), 2: (3,), 3: (1,), 4: (1,)}, live=[1, 2, 3])

    assert graph == {1: (2, 3), 2: (1, 3), 3: (1, 2)}


def test_holder_choice_validates_its_arguments() -> None:
    rng = DeterministicRandom(1)
    with pytest.raises(ValueError, match="degree"):
        choose_holders(list(range(10)), 3, 10, rng)
    with pytest.raises(ValueError, match="exactly one"):
        choose_holders([1, 2, 3], 7, 1, rng)


def test_secure_shuffle_is_a_permutation() -> None:
    items = list(range(50))
    shuffled = secure_shuffle(items, DeterministicRandom(3))

    assert sorted(shuffled) == items
    assert shuffled != items


def test_protocol_abort_names_stage_and_nodes() -> None:
    error = ProtocolAbort("unmask", [5, 3], "too few shares")

    assert error.node_ids == (3, 5)
    assert str(error) == "secure aggregation aborted in unmask: too few shares (nodes 3, 5)"


class _Scripted:
    """A random source that replays given bytes, then a seeded stream."""

    def __init__(self, first: bytes) -> None:
        self._first = first
        self._rest = DeterministicRandom(4)

    def random_bytes(self, count: int) -> bytes:
        head, self._first = self._first[:count], self._first[count:]
        return head + self._rest.random_bytes(count - len(head))


def test_share_coefficients_are_exactly_uniform_by_rejection() -> None:
    # 0x7FFFFFFF (and 0xFFFFFFFF, equal to it in 31 bits) is p itself: redrawn, never
    # reduced to 0; every other 31-bit value is kept as it is.
    first = bytes.fromhex("7fffffffffffffff000000057ffffffe")
    values = uniform_field_elements(_Scripted(first), 4)

    assert values[2] == 5 and values[3] == PRIME - 1
    assert values[0] < PRIME and values[1] < PRIME
    assert values[0] != 0 or values[1] != 0  # redrawn from the stream, not reduced
    many = uniform_field_elements(DeterministicRandom(8), 200_000)
    assert int(many.max()) < PRIME
    # The top bit of 31 is set about half the time (no modulo bias towards small values).
    assert abs(float(np.mean(many >= (1 << 30))) - 0.5) < 0.01
