"""The PNG plots of a run summary: which files, valid images, older and empty summaries."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from fedge.errors import ConfigError, StorageError
from fl_server.run_summary import RunSummary
from simulations._run_rounds import read_series
from simulations.plots import compare_plots, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _round(number: int, accuracy: float, **extra: Any) -> dict[str, Any]:
    # The shape `fedge sim run` writes (fl_server.run_summary.SummaryWriter.on_round).
    entry: dict[str, Any] = {
        "round": number,
        "accuracy": accuracy,
        "loss": 2.5 - accuracy,
        "seconds": 1.5,
        "replies": 3,
        "failures": 0,
        "model_sha256": "ab" * 32,
        "model_path": f"/tmp/home/runs/r/models/round-{number:04d}.npz",
        "secure_aggregation": None,
        "store_version": number + 1,
    }
    entry.update(extra)
    return entry


def _summary(
    rounds: list[dict[str, Any]], *, dp: str = "off", privacy: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "run_id": "20261202T222150Z-f15363",
        "status": "completed",
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "initial_accuracy": 0.107,
        "rounds": rounds,
        "config": {
            "num_clients": 3,
            "num_rounds": 3,
            "secure_agg": False,
            "dp": dp,
            "epsilon": 5.0 if dp != "off" else None,
            "train": {"local_epochs": 1, "learning_rate": 0.05},
        },
        "config_sha256": "83" * 32,
        "data": {"train_examples": 3000, "test_examples": 1000, "client_sizes": [1311, 507, 1182]},
        "wall_seconds": 19.256,
        "audit": {"db_url": "sqlite:////tmp/home/fedge.db", "head_hash": "54" * 32},
        "code_version": "0.1.0+gcfdf0095f7b2",
        "error": None,
        "privacy": privacy,
    }


def _central_privacy(epsilon: float = 4.73) -> dict[str, Any]:
    return {
        "mechanism": "central-gaussian",
        "level": "client",
        "epsilon": epsilon,
        "delta": 1e-05,
        "budget": 5.0,
        "stopped": None,
        "max_client_epsilon": epsilon,
    }


def _dp_run() -> dict[str, Any]:
    rounds = [
        _round(1, 0.49, sampled=3, completed=3, dropped=0, refused={}, epsilon=2.1),
        _round(
            2, 0.55, sampled=3, completed=2, dropped=1, refused={"privacy_budget": 1}, epsilon=3.4
        ),
        _round(3, 0.60, sampled=3, completed=3, dropped=0, refused={}, epsilon=4.73),
    ]
    return _summary(rounds, dp="central", privacy=_central_privacy())


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_a_dp_run_gets_four_valid_pngs(tmp_path: Path) -> None:
    written = write_plots(_dp_run(), tmp_path / "plots")

    assert [p.name for p in written] == [
        "accuracy.png",
        "loss.png",
        "epsilon.png",
        "participation.png",
    ]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert _png_size(path) == (840, 504)
        assert 5_000 < path.stat().st_size < 500_000


def test_a_run_without_dp_has_no_epsilon_plot(tmp_path: Path) -> None:
    summary = _summary([_round(1, 0.49), _round(2, 0.5)])

    written = write_plots(summary, tmp_path)

    assert [p.name for p in written] == ["accuracy.png", "loss.png", "participation.png"]
    assert not (tmp_path / "epsilon.png").exists()


def test_a_run_without_completed_round_still_plots_the_initial_accuracy(tmp_path: Path) -> None:
    summary = _summary([], dp="central", privacy=_central_privacy())
    summary["status"] = "failed"
    no_initial = dict(summary, initial_accuracy=None)

    written = write_plots(summary, tmp_path / "a")
    write_plots(no_initial, tmp_path / "b")

    assert {p.name for p in written} == {
        "accuracy.png",
        "loss.png",
        "epsilon.png",
        "participation.png",
    }
    assert all(_png_size(p) == (840, 504) for p in written)
    # The initial model's point is drawn: the image differs from one without it.
    assert (tmp_path / "a/accuracy.png").read_bytes() != (tmp_path / "b/accuracy.png").read_bytes()


def test_an_older_summary_and_a_run_summary_object_are_plotted(tmp_path: Path) -> None:
    # No participation counts, no per-round epsilon, a failed round's NaN loss, a secure round.
    secure = {"sampled": 4, "survivors": 3, "upload_bytes_per_client": 525391, "aborted": None}
    rounds = [
        _round(1, 0.4, replies=3, failures=1, secure_aggregation=secure),
        _round(2, 0.45, loss=float("nan")),
    ]
    summary = RunSummary(
        run_id="r-old",
        config={"dp": "distributed", "secure_agg": True},
        config_sha256="00" * 32,
        data={},
        db_url="sqlite:///fedge.db",
        initial_accuracy=0.1,
        rounds=rounds,
        privacy={"mechanism": "distributed-ddg", "epsilon": 9.0, "budget": None},
    )

    written = write_plots(summary, tmp_path)

    assert [p.name for p in written] == [
        "accuracy.png",
        "loss.png",
        "epsilon.png",
        "participation.png",
    ]
    series = read_series(summary)
    first, second = series.completed_rounds
    assert (first.sampled, first.completed, first.dropped, first.refused) == (4, 3, 1, None)
    assert (second.sampled, second.completed, second.dropped) == (3, 3, 0)
    assert second.loss is None
    assert series.final_epsilon == 9.0 and series.epsilon_budget is None


def test_missing_fields_read_as_none() -> None:
    series = read_series({"rounds": [{"accuracy": 0.3}, {"round": 7, "accuracy": True}]})

    assert series.run_id == "" and not series.has_dp
    assert [p.round for p in series.points] == [1, 7]
    assert series.points[0].sampled is None and series.points[0].dropped is None
    assert series.points[1].accuracy is None


def test_the_same_summary_gives_the_same_bytes_and_pyplot_keeps_no_figure(tmp_path: Path) -> None:
    open_before = plt.get_fignums()

    first = write_plots(_dp_run(), tmp_path / "one")
    second = write_plots(_dp_run(), tmp_path / "two")

    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert plt.get_fignums() == open_before


def test_compare_plots_overlays_two_runs(tmp_path: Path) -> None:
    runs = {
        "attack": _summary([_round(1, 0.2), _round(2, 0.25)]),
        "attack + robust aggregation": _dp_run(),
    }

    written = compare_plots(runs, tmp_path)

    assert [p.name for p in written] == ["compare-accuracy.png", "compare-loss.png"]
    assert all(_png_size(p) == (840, 504) for p in written)


@pytest.mark.parametrize(
    ("summaries", "message"),
    [
        ({}, "at least one run summary"),
        ({" ": {"rounds": []}}, "non-empty label"),
        ({"a": {"rounds": "none"}}, "rounds must be a list of objects"),
        ({"a": [1, 2]}, "must be a RunSummary or a mapping"),
    ],
)
def test_compare_plots_refuses_what_is_not_a_set_of_runs(
    tmp_path: Path, summaries: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        compare_plots(summaries, tmp_path)

    assert not list(tmp_path.iterdir())


def test_an_unwritable_folder_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    with pytest.raises(StorageError, match="cannot create plot folder"):
        write_plots(_dp_run(), blocker / "plots")
