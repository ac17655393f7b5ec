"""Every DP mode a run can use is described in the reports' NIST SP 800-226 terms."""

from __future__ import annotations

import pytest

from fl_server.reports.terms import DP_TERMS, NO_DP
from strategies.dp_mode import DpMode


@pytest.mark.parametrize("mode", [m for m in DpMode if m is not DpMode.OFF])
def test_every_dp_mode_has_its_own_terms(mode: DpMode) -> None:
    terms = DP_TERMS[mode.value]

    assert terms != NO_DP
    assert terms.unit_of_privacy and terms.accountant and terms.noise_added_where


def test_shared_noise_dp_sgd_is_example_level_and_trusts_nobody_beyond_secure_aggregation() -> None:
    terms = DP_TERMS[DpMode.SAMPLE_DISTRIBUTED.value]

    assert terms.unit_of_privacy.startswith("example level")
    assert terms.trusted == DP_TERMS[DpMode.DISTRIBUTED.value].trusted
