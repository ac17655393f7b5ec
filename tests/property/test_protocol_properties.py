from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_agg.errors import ProtocolAbort
from tests.unit.secure_agg.test_protocol import _round

NODES = [1000 + 7 * i for i in range(10)]
STAGES = ("advertise", "share", "mask", "unmask")


@settings(max_examples=40, deadline=None)
@given(
    assignment=st.lists(st.sampled_from((None,) * 12 + STAGES), min_size=10, max_size=10),
    seed=st.integers(0, 10_000),
)
def test_unmasking_equals_the_survivors_sum_or_aborts_cleanly(
    assignment: list[str | None], seed: int
) -> None:
    drop_at: dict[str, list[int]] = {}
    for node, stage in zip(NODES, assignment, strict=True):
        if stage is not None:
            drop_at.setdefault(stage, []).append(node)
    excluded: list[int] = []
    try:
        total, expected, survivors = _round(
            10, degree=6, threshold=4, drop_at=drop_at, seed=seed, excluded=excluded
        )
    except ProtocolAbort as abort:
        # Only legitimate when someone really lost too many neighbours.
        assert abort.node_ids
        return
    np.testing.assert_array_equal(total, expected)
    early = {n for stage in ("advertise", "share", "mask") for n in drop_at.get(stage, [])}
    # Everyone who did not drop is in the sum, unless the server had to leave it out
    # because too few of its own holders were left.
    assert set(survivors) | set(excluded) == set(NODES) - early | set(excluded)
    assert not set(survivors) & (early | set(excluded))
