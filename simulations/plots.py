"""PNG plots of simulation runs: accuracy, loss, privacy spent and participation per round.

:func:`write_plots` draws one run's summary (a :class:`RunSummary` or the JSON a
run wrote); :func:`compare_plots` overlays several runs (a defence on and off,
two strategies). Each figure is a :class:`matplotlib.figure.Figure` drawn on its
own Agg canvas: nothing touches pyplot's global state, so calls from threads or
a long-lived process never leak figures or pick up an interactive backend.

Older summaries lack some fields (the participation counts, the cumulative
epsilon per round): the plots draw what the summary has and say what is
missing instead of failing (see :mod:`simulations._run_rounds`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from fedge.errors import ConfigError, StorageError
from fl_server.run_summary import RunSummary
from simulations._run_rounds import RoundPoint, RunSeries, read_series

__all__ = [
    "ACCURACY_PNG",
    "COMPARE_ACCURACY_PNG",
    "COMPARE_LOSS_PNG",
    "EPSILON_PNG",
    "LOSS_PNG",
    "PARTICIPATION_PNG",
    "compare_plots",
    "write_plots",
]

logger = logging.getLogger(__name__)

ACCURACY_PNG = "accuracy.png"
LOSS_PNG = "loss.png"
EPSILON_PNG = "epsilon.png"
PARTICIPATION_PNG = "participation.png"
COMPARE_ACCURACY_PNG = "compare-accuracy.png"
COMPARE_LOSS_PNG = "compare-loss.png"

_ROUND_LABEL = "round (0 = initial model)"
_FIGSIZE = (7.0, 4.2)
_DPI = 120
# Colour per participation count: completed reads as good, dropped and refused as losses.
_PARTICIPATION = (
    ("sampled", "sampled", "#7f8c9a"),
    ("completed", "completed", "#2a9d4b"),
    ("dropped", "dropped", "#e08a1e"),
    ("refused", "refused (of dropped)", "#c0392b"),
)
_MAX_LABELLED_ROUNDS = 12


def _figure() -> tuple[Figure, Axes]:
    figure = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # the non-interactive Agg canvas, attached to this figure only
    return figure, figure.add_subplot()


def _titles(figure: Figure, axes: Axes, title: str, subtitle: str) -> None:
    figure.suptitle(title)
    if subtitle:
        axes.set_title(subtitle, fontsize="small", color="0.35")


def _round_axis(axes: Axes) -> None:
    axes.set_xlabel(_ROUND_LABEL)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)


def _round_limits(axes: Axes, rounds: Sequence[int], *, first: int = 0, pad: float = 0.3) -> None:
    # Fixed limits: a single point would otherwise get fractional round ticks.
    last = max([first + 1, *rounds]) if first == 0 else max([first, *rounds])
    axes.set_xlim(min([first, *rounds]) - pad, last + pad)


def _note(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="0.4")


def _save(figure: Figure, path: Path) -> Path:
    try:
        # No "Software" entry: the bytes depend on the data, not on the matplotlib build.
        figure.savefig(path, format="png", metadata={"Software": None})
    except OSError as exc:
        raise StorageError(f"cannot write plot {path}: {exc}") from exc
    logger.debug("wrote %s", path)
    return path


def _prepare(out_dir: Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create plot folder {out}: {exc}") from exc
    return out


def _xy(points: Sequence[RoundPoint], field: str) -> tuple[list[int], list[float]]:
    pairs = [(p.round, getattr(p, field)) for p in points if getattr(p, field) is not None]
    return [r for r, _ in pairs], [v for _, v in pairs]


def _accuracy_axes(axes: Axes) -> None:
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))


def _plot_metric(series: RunSeries, field: str, path: Path) -> Path:
    figure, axes = _figure()
    rounds, values = _xy(series.points, field)
    if field == "accuracy":
        _titles(figure, axes, "Test accuracy of the global model", series.describe())
        _accuracy_axes(axes)
    else:
        _titles(figure, axes, "Test loss of the global model", series.describe())
        axes.set_ylabel("test loss")
    _round_axis(axes)
    _round_limits(axes, [p.round for p in series.points])
    if values:
        axes.plot(rounds, values, marker="o", color="C0")
    if not series.completed_rounds:
        _note(axes, "no completed round" if values else f"no completed round; no {field} recorded")
    elif not values:
        _note(axes, f"this summary records no {field}")
    return _save(figure, path)


def _plot_epsilon(series: RunSeries, path: Path) -> Path:
    figure, axes = _figure()
    _titles(figure, axes, "Privacy spent by the run (cumulative ε)", series.describe())
    axes.set_ylabel("ε")
    _round_axis(axes)
    rounds, values = _xy(series.completed_rounds, "epsilon")
    if values:
        axes.plot([0, *rounds], [0.0, *values], marker="o", color="C4", label="ε spent")
    elif series.final_epsilon is not None and series.completed_rounds:
        last = max(p.round for p in series.completed_rounds)
        axes.plot(
            [last],
            [series.final_epsilon],
            marker="D",
            linestyle="none",
            color="C4",
            label="ε at the end (no per-round values in this summary)",
        )
    else:
        _note(axes, "no completed round" if not series.completed_rounds else "no ε recorded")
    if series.epsilon_budget is not None:
        axes.axhline(
            series.epsilon_budget,
            linestyle="--",
            color="C3",
            label=f"budget ε = {series.epsilon_budget:g}",
        )
    _round_limits(axes, [p.round for p in series.points])
    top = max([*values, series.final_epsilon or 0.0, series.epsilon_budget or 0.0, 1.0])
    axes.set_ylim(0.0, top * 1.12)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right")
    return _save(figure, path)


def _plot_participation(series: RunSeries, path: Path) -> Path:
    figure, axes = _figure()
    _titles(figure, axes, "Participation per round", series.describe())
    axes.set_xlabel("round")
    axes.set_ylabel("clients")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, axis="y", alpha=0.3)
    points = series.completed_rounds
    width = 0.8 / len(_PARTICIPATION)
    drawn = False
    for index, (field, label, colour) in enumerate(_PARTICIPATION):
        rounds, values = _xy(points, field)
        if not values:
            continue
        offset = (index - (len(_PARTICIPATION) - 1) / 2) * width
        bars = axes.bar(
            [r + offset for r in rounds], values, width=width, label=label, color=colour
        )
        if len(points) <= _MAX_LABELLED_ROUNDS:
            axes.bar_label(bars, fontsize="x-small", padding=1)
        drawn = True
    if drawn:
        axes.set_xticks(sorted({p.round for p in points}))
        _round_limits(axes, [p.round for p in points], first=min(p.round for p in points), pad=0.6)
        tallest = max(v for field, _, _ in _PARTICIPATION for v in _xy(points, field)[1])
        axes.set_ylim(0.0, max(tallest, 1) * 1.15)
        # Outside the axes: bars reach the top of every corner.
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        _note(axes, "no completed round" if not points else "no participation counts recorded")
    return _save(figure, path)


def write_plots(summary: RunSummary | Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write the PNG plots of one run into ``out_dir`` (created if missing).

    Parameters
    ----------
    summary
        The run's :class:`RunSummary`, or the JSON document ``fedge sim run
        --out`` wrote (older summaries with fewer fields are accepted).
    out_dir
        The folder to write into; existing plots of the same names are replaced.

    Returns
    -------
    list[Path]
        The files written, in this order: ``accuracy.png`` and ``loss.png``
        (per round, round 0 being the initial model), ``epsilon.png``
        (cumulative ε with the budget as a dashed line; only for a DP run) and
        ``participation.png`` (sampled, completed, dropped and refused clients
        per round). A run without a completed round still gets every file, with
        what it has (the initial accuracy) and a note.

    Raises
    ------
    ConfigError
        If ``summary`` is not a run summary (not a mapping, or rounds that are
        not a list of objects).
    StorageError
        If a file cannot be written.
    """
    series = read_series(summary)
    out = _prepare(out_dir)
    written = [
        _plot_metric(series, "accuracy", out / ACCURACY_PNG),
        _plot_metric(series, "loss", out / LOSS_PNG),
    ]
    if series.has_dp:
        written.append(_plot_epsilon(series, out / EPSILON_PNG))
    written.append(_plot_participation(series, out / PARTICIPATION_PNG))
    return written


def compare_plots(
    summaries: Mapping[str, RunSummary | Mapping[str, Any]], out_dir: Path
) -> list[Path]:
    """Overlay several runs' accuracy and loss curves (e.g. an attack with and without a defence).

    Parameters
    ----------
    summaries
        Each run's label (shown in the legend, in the mapping's order) and its
        summary, as accepted by :func:`write_plots`.
    out_dir
        The folder to write into (created if missing).

    Returns
    -------
    list[Path]
        ``compare-accuracy.png`` and ``compare-loss.png``.

    Raises
    ------
    ConfigError
        If ``summaries`` is empty, a label is empty, or a value is not a run summary.
    StorageError
        If a file cannot be written.
    """
    if not summaries:
        raise ConfigError("compare_plots needs at least one run summary")
    if any(not isinstance(label, str) or not label.strip() for label in summaries):
        raise ConfigError("every run to compare needs a non-empty label")
    runs = [(label, read_series(summary)) for label, summary in summaries.items()]
    out = _prepare(out_dir)
    written = []
    for field, title, name in (
        ("accuracy", "Test accuracy of the global model", COMPARE_ACCURACY_PNG),
        ("loss", "Test loss of the global model", COMPARE_LOSS_PNG),
    ):
        figure, axes = _figure()
        _titles(figure, axes, title, f"{len(runs)} runs compared")
        _round_axis(axes)
        if field == "accuracy":
            _accuracy_axes(axes)
        else:
            axes.set_ylabel("test loss")
        for index, (label, series) in enumerate(runs):
            rounds, values = _xy(series.points, field)
            shown = label if values else f"{label} (nothing recorded)"
            # Plot even an empty series so that every run keeps its colour and legend entry.
            axes.plot(rounds, values, marker="o", color=f"C{index % 10}", label=shown)
        _round_limits(axes, [p.round for _, series in runs for p in series.points])
        axes.legend(loc="best", fontsize="small")
        written.append(_save(figure, out / name))
    return written
