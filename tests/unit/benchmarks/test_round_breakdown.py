"""The secure-round benchmark's breakdown: which exchange, client record and byte counts where."""

from __future__ import annotations

import pytest

from benchmarks.secagg_round import _Exchange, breakdown


def test_a_round_splits_into_server_time_exchanges_client_cpu_and_bytes() -> None:
    exchanges = [
        _Exchange(start=0.5, end=0.9, upload=10, download=20, messages=2),  # the round before
        _Exchange(start=1.0, end=2.0, upload=100, download=400, messages=2),
        _Exchange(start=2.0, end=2.0, upload=0, download=0, messages=0),  # a skipped evaluation
        _Exchange(start=2.5, end=4.0, upload=300, download=200, messages=2),
    ]
    records = [
        (0.6, 9.0, 9.0),  # before the round: not counted
        (1.1, 0.2, 0.3),
        (1.5, 0.4, 0.5),
        (2.6, 1.0, 1.2),
        (3.9, 0.6, 0.7),
    ]

    result = breakdown(
        start=1.0,
        end=5.0,
        exchanges=exchanges,
        client_records=records,
        clients=2,
        actors=2,
        stage_names=["keys", "inputs"],
    )

    assert result["round_s"] == 4.0
    assert result["exchange_s"] == pytest.approx(2.5)
    assert result["server_s"] == pytest.approx(1.5)
    assert result["client_cpu_s_per_client"] == pytest.approx(1.1)  # (0.6 + 1.6) / 2
    assert result["engine_s"] == pytest.approx(2.5 - 2.2 / 2)
    assert result["upload_bytes_per_client"] == 200
    assert result["download_bytes_per_client"] == 300
    keys, inputs = result["stages"]
    assert (keys["name"], inputs["name"]) == ("keys", "inputs")
    assert keys["client_cpu_s_per_client"] == pytest.approx(0.3)
    assert inputs["client_cpu_s_per_client"] == pytest.approx(0.8)
    assert (inputs["upload_bytes"], inputs["download_bytes"]) == (300, 200)


def test_stage_names_that_do_not_match_the_exchanges_are_numbered_instead() -> None:
    exchanges = [_Exchange(start=1.0, end=2.0, upload=1, download=1, messages=1)]

    result = breakdown(
        start=0.0,
        end=3.0,
        exchanges=exchanges,
        client_records=[],
        clients=1,
        actors=1,
        stage_names=["setup", "share-keys"],
    )

    assert [s["name"] for s in result["stages"]] == ["exchange-1"]
    assert result["engine_s"] == pytest.approx(1.0)  # no client records: all engine
