from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from secure_agg.randomness import DeterministicRandom
from secure_agg.shamir import combine, split


@settings(max_examples=50, deadline=None)
@given(data=st.data(), num_shares=st.integers(1, 20), seed=st.integers(0, 2**64))
def test_any_t_of_n_shares_reconstruct_and_t_minus_one_do_not(
    data: st.DataObject, num_shares: int, seed: int
) -> None:
    threshold = data.draw(st.integers(1, num_shares))
    rng = DeterministicRandom(seed)
    secrets = [rng.random_bytes(32) for _ in range(data.draw(st.integers(1, 3)))]
    shares = split(secrets, threshold=threshold, num_shares=num_shares, rng=rng)
    holders = sorted(data.draw(st.permutations(range(num_shares)))[:threshold])

    assert combine([h + 1 for h in holders], shares[holders], num_secrets=len(secrets)) == secrets
    if threshold > 1:
        fewer = holders[:-1]
        assert combine([h + 1 for h in fewer], shares[fewer], num_secrets=len(secrets)) != secrets
