from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedge.errors import ConfigError
from fl_client import dp_sgd
from fl_client.dp_sgd import noise_multiplier_for
from fl_client.noise_plan import (
    NOISE_PLAN_STATE_KEY,
    NoiseSearch,
    noise_multiplier_in,
    recalled_noise,
)
from strategies.accounting import AccountantKind

SEARCH = NoiseSearch(target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=235)


class CountingSearch:
    """Stand in for Opacus' search: count the calls, answer a value unique to the inputs."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> float:
        self.calls.append(kwargs)
        return self.answer(
            NoiseSearch(
                target_epsilon=kwargs["target_epsilon"],
                delta=kwargs["target_delta"],
                sample_rate=kwargs["sample_rate"],
                steps=kwargs["steps"],
                accountant=AccountantKind(kwargs["accountant"]),
            )
        )

    @staticmethod
    def answer(search: NoiseSearch) -> float:
        return round(
            1.0
            + search.target_epsilon / 10
            + search.delta * 1e3
            + search.sample_rate
            + search.steps / 1e4
            + (0.5 if search.accountant is AccountantKind.RDP else 0.0),
            9,
        )


@pytest.fixture
def opacus_search(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingSearch]:
    """Replace Opacus' search (behind the per-process memo, which starts and ends empty)."""
    counting = CountingSearch()
    dp_sgd._cached_noise_multiplier.cache_clear()
    monkeypatch.setattr(dp_sgd, "get_noise_multiplier", counting)
    yield counting
    dp_sgd._cached_noise_multiplier.cache_clear()


def _another_process() -> None:
    # What a device meets when Flower's simulation serves its next round from another
    # Ray actor: an empty per-process memo, and only its own Context carried along.
    dp_sgd._cached_noise_multiplier.cache_clear()


def test_a_device_searches_once_per_run_whatever_process_serves_it(
    opacus_search: CountingSearch,
) -> None:
    state = RecordDict()

    first = noise_multiplier_in(state, SEARCH)
    _another_process()
    second = noise_multiplier_in(state, SEARCH)

    assert first == second == CountingSearch.answer(SEARCH)
    assert len(opacus_search.calls) == 1
    assert recalled_noise(state, SEARCH) == first


def test_without_its_state_a_device_in_another_process_searches_again(
    opacus_search: CountingSearch,
) -> None:
    # The failure the plan exists for: the per-process memo alone misses across actors.
    noise_multiplier_in(RecordDict(), SEARCH)
    _another_process()
    noise_multiplier_in(RecordDict(), SEARCH)

    assert len(opacus_search.calls) == 2


def test_the_plan_holds_the_inputs_with_the_answer(opacus_search: CountingSearch) -> None:
    state = RecordDict()

    noise = noise_multiplier_in(state, SEARCH)

    record = state.config_records[NOISE_PLAN_STATE_KEY]
    assert record["noise-multiplier"] == noise
    assert record["target-epsilon"] == 3.0
    assert record["delta"] == 1e-5
    assert record["sample-rate"] == 0.02
    assert record["steps"] == 235
    assert record["accountant"] == "prv"
    assert str(record["search"]).startswith("opacus ")
    assert opacus_search.calls == [
        {
            "target_epsilon": 3.0,
            "target_delta": 1e-5,
            "sample_rate": 0.02,
            "steps": 235,
            "accountant": "prv",
        }
    ]


@pytest.mark.parametrize(
    "other",
    [
        NoiseSearch(target_epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=235),
        NoiseSearch(target_epsilon=3.0, delta=1e-6, sample_rate=0.02, steps=235),
        NoiseSearch(target_epsilon=3.0, delta=1e-5, sample_rate=0.03, steps=235),
        NoiseSearch(target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=236),
        NoiseSearch(
            target_epsilon=3.0,
            delta=1e-5,
            sample_rate=0.02,
            steps=235,
            accountant=AccountantKind.RDP,
        ),
    ],
    ids=["target", "delta", "sample-rate", "steps", "accountant"],
)
def test_a_plan_never_answers_for_other_inputs(
    opacus_search: CountingSearch, other: NoiseSearch
) -> None:
    state = RecordDict()
    noise_multiplier_in(state, SEARCH)
    _another_process()

    assert recalled_noise(state, other) is None
    answer = noise_multiplier_in(state, other)

    assert answer == CountingSearch.answer(other) != CountingSearch.answer(SEARCH)
    assert len(opacus_search.calls) == 2
    # The plan now holds the new inputs: the old ones are searched again, never confused.
    assert recalled_noise(state, other) == answer
    assert recalled_noise(state, SEARCH) is None


def test_devices_keep_their_own_plans(opacus_search: CountingSearch) -> None:
    # Two partitions of different sizes: two sample rates, two states.
    small = NoiseSearch(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=100)
    states = {SEARCH: RecordDict(), small: RecordDict()}

    for _ in range(3):
        for search, state in states.items():
            _another_process()
            assert noise_multiplier_in(state, search) == CountingSearch.answer(search)

    assert len(opacus_search.calls) == 2


def test_another_search_implementation_is_searched_again(opacus_search: CountingSearch) -> None:
    state = RecordDict()
    noise_multiplier_in(state, SEARCH)
    record = state.config_records[NOISE_PLAN_STATE_KEY]
    record["search"] = "opacus 0.0.1 get_noise_multiplier"
    _another_process()

    noise_multiplier_in(state, SEARCH)

    assert len(opacus_search.calls) == 2


DAMAGE: list[tuple[str, dict[str, Any], str]] = [
    ("sigma as text", {"noise-multiplier": "1.5"}, "no float sigma"),
    ("sigma as an int", {"noise-multiplier": 2}, "no float sigma"),
    ("sigma as a bool", {"noise-multiplier": True}, "no float sigma"),
    ("sigma nan", {"noise-multiplier": math.nan}, "noise_multiplier must be in"),
    ("sigma infinite", {"noise-multiplier": math.inf}, "noise_multiplier must be in"),
    ("sigma zero", {"noise-multiplier": 0.0}, "noise_multiplier must be in"),
    ("sigma negative", {"noise-multiplier": -1.2}, "noise_multiplier must be in"),
    ("sigma too large", {"noise-multiplier": 1e9}, "noise_multiplier must be in"),
    ("steps as a float", {"steps": 235.0}, "'steps' is float, not int"),
    ("steps as a bool", {"steps": True}, "'steps' is bool, not int"),
    ("target as an int", {"target-epsilon": 3}, "'target-epsilon' is int, not float"),
    ("accountant as bytes", {"accountant": b"prv"}, "'accountant' is bytes, not str"),
    ("an extra field", {"note": "x"}, "other fields"),
]


@pytest.mark.parametrize(("damage", "message"), [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_plan_is_searched_again_and_replaced(
    opacus_search: CountingSearch,
    caplog: pytest.LogCaptureFixture,
    damage: dict[str, Any],
    message: str,
) -> None:
    state = RecordDict()
    noise_multiplier_in(state, SEARCH)
    record = state.config_records[NOISE_PLAN_STATE_KEY]
    for name, value in damage.items():
        record[name] = value
    _another_process()

    with caplog.at_level(logging.WARNING, logger="fl_client.noise_plan"):
        noise = noise_multiplier_in(state, SEARCH)

    assert noise == CountingSearch.answer(SEARCH)
    assert len(opacus_search.calls) == 2
    assert message in caplog.text
    assert recalled_noise(state, SEARCH) == noise  # the entry was rewritten whole


@pytest.mark.parametrize("field", ["noise-multiplier", "steps", "accountant", "search"])
def test_a_plan_missing_a_field_is_searched_again(
    opacus_search: CountingSearch, field: str
) -> None:
    state = RecordDict()
    noise_multiplier_in(state, SEARCH)
    del state.config_records[NOISE_PLAN_STATE_KEY][field]
    _another_process()

    assert recalled_noise(state, SEARCH) is None
    assert noise_multiplier_in(state, SEARCH) == CountingSearch.answer(SEARCH)
    assert len(opacus_search.calls) == 2


def test_a_record_of_another_kind_under_the_key_is_replaced(
    opacus_search: CountingSearch,
) -> None:
    state = RecordDict({NOISE_PLAN_STATE_KEY: MetricRecord({"noise-multiplier": 0.1})})

    noise = noise_multiplier_in(state, SEARCH)

    assert noise == CountingSearch.answer(SEARCH)
    assert isinstance(state[NOISE_PLAN_STATE_KEY], ConfigRecord)
    assert len(opacus_search.calls) == 1


def test_an_unreachable_target_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def too_low(**kwargs: Any) -> float:
        raise ValueError("The privacy budget is too low.")

    dp_sgd._cached_noise_multiplier.cache_clear()
    monkeypatch.setattr(dp_sgd, "get_noise_multiplier", too_low)
    state = RecordDict()
    try:
        with pytest.raises(ConfigError, match=r"no noise multiplier reaches epsilon 3\.0"):
            noise_multiplier_in(state, SEARCH)
    finally:
        dp_sgd._cached_noise_multiplier.cache_clear()

    assert NOISE_PLAN_STATE_KEY not in state


@pytest.mark.filterwarnings("ignore:Optimal order is the (smallest|largest) alpha:UserWarning")
def test_the_plan_keeps_what_the_real_search_finds() -> None:
    # RDP: Opacus' search in milliseconds; the plan must hold exactly its answer.
    search = NoiseSearch(
        target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=20, accountant=AccountantKind.RDP
    )
    state = RecordDict()

    noise = noise_multiplier_in(state, search)

    assert noise == noise_multiplier_for(
        target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=20, accountant=AccountantKind.RDP
    )
    assert recalled_noise(state, search) == noise


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be a finite number > 0, got 0.0"),
        ({"target_epsilon": math.inf}, "target_epsilon must be a finite number > 0, got inf"),
        ({"target_epsilon": True}, "target_epsilon must be a finite number > 0, got True"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"accountant": "prv"}, "accountant must be an AccountantKind, got 'prv'"),
    ],
)
def test_noise_search_checks_its_inputs(arguments: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "target_epsilon": 3.0,
        "delta": 1e-5,
        "sample_rate": 0.02,
        "steps": 235,
    }
    with pytest.raises(ConfigError, match=message):
        NoiseSearch(**(fields | arguments))
