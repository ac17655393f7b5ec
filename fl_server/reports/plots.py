"""The report's plots (matplotlib, Agg backend) as PNG ``data:`` URIs for self-contained HTML."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

from fl_server.reports.model import RunReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["run_plots"]

_SIZE = (6.4, 2.8)
_DPI = 90


def _data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def run_plots(report: RunReport) -> dict[str, str]:
    """Return the run's plots by name (``epsilon``, ``accuracy``, ``participation``).

    A plot with nothing to show (no DP, no rounds) is left out.
    """
    # The Figure API without pyplot: no global state, no GUI backend, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    plots: dict[str, str] = {}
    dp_rounds = [r for r in report.differential_privacy.per_round if r.epsilon_cumulative]
    if dp_rounds:
        figure = Figure(figsize=_SIZE)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        numbers = [r.round for r in dp_rounds]
        axes.bar(numbers, [r.epsilon_round or 0.0 for r in dp_rounds], label="per round")
        axes.plot(
            numbers,
            [r.epsilon_cumulative or 0.0 for r in dp_rounds],
            "o-",
            color="C3",
            label="cumulative",
        )
        budget = report.differential_privacy.epsilon_budget
        if budget is not None:
            axes.axhline(budget, linestyle="--", color="grey", label="budget")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("round")
        axes.set_ylabel("epsilon")
        axes.set_title("Privacy loss (privacy ledger)")
        axes.legend(loc="upper left", fontsize="small")
        plots["epsilon"] = _data_uri(figure)
    accuracy = [r for r in report.rounds if r.accuracy is not None]
    if accuracy:
        figure = Figure(figsize=_SIZE)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot([r.round for r in accuracy], [r.accuracy or 0.0 for r in accuracy], "o-")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("round")
        axes.set_ylabel("accuracy")
        axes.set_title("Global model accuracy")
        plots["accuracy"] = _data_uri(figure)
    counted = [r for r in report.participants.per_round if not r.damaged]
    if counted:
        figure = Figure(figsize=_SIZE)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        numbers = [r.round for r in counted]
        width = 0.27
        for offset, label, values in (
            (-width, "sampled", [r.sampled or 0 for r in counted]),
            (0.0, "completed", [r.completed or 0 for r in counted]),
            (width, "dropped", [r.dropped or 0 for r in counted]),
        ):
            axes.bar([n + offset for n in numbers], values, width=width, label=label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("round")
        axes.set_ylabel("clients")
        axes.set_title("Participation and dropouts")
        axes.legend(loc="upper left", fontsize="small")
        plots["participation"] = _data_uri(figure)
    return plots
