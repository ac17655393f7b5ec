"""A live rich view of a running federation: one row per round, a progress bar."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fl_server import RoundReport

__all__ = ["RoundDisplay"]


class RoundDisplay:
    """Show each round's accuracy, loss and time as it completes.

    Use as a context manager around the run; it is a :class:`fl_server.RoundObserver`.
    On a terminal the table and a progress bar update in place; elsewhere (CI
    logs, pipes) each round is printed as one line as soon as it completes.
    """

    def __init__(self, console: Console, *, num_rounds: int, title: str) -> None:
        self._console = console
        self._started = time.perf_counter()
        self._table = Table(title=title, expand=False)
        for column, justify in (
            ("round", "right"),
            ("accuracy", "right"),
            ("loss", "right"),
            ("clients ok/failed", "right"),
            ("round s", "right"),
            ("elapsed s", "right"),
            ("aggregation", "left"),
        ):
            self._table.add_column(column, justify=justify)  # type: ignore[arg-type]
        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("rounds", total=num_rounds)
        self._live = Live(
            Group(self._table, self._progress),
            console=console,
            refresh_per_second=4,
            transient=False,
        )

    def __enter__(self) -> RoundDisplay:
        if self._console.is_terminal:
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._console.is_terminal:
            self._live.__exit__(exc_type, exc, traceback)

    def on_round(self, report: RoundReport) -> None:
        """Add the round's row and advance the bar."""
        label = "initial" if report.server_round == 0 else str(report.server_round)
        clients = "-" if report.server_round == 0 else f"{report.num_replies}/{report.num_failures}"
        elapsed = time.perf_counter() - self._started
        secure = report.secure_aggregation
        aggregation = (
            "plain"
            if secure is None
            else f"SecAgg+ k={secure['degree']} t={secure['threshold']} "
            f"{secure['ring_bits']}-bit, {secure['upload_bytes_per_client'] / 1e6:.2f} MB up"
        )
        if report.server_round == 0:
            aggregation = ""
        cells = (
            label,
            f"{report.accuracy:.4f}",
            f"{report.loss:.4f}",
            clients,
            f"{report.seconds:.1f}",
            f"{elapsed:.1f}",
            aggregation,
        )
        if not self._console.is_terminal:
            self._console.print(
                f"round {label}: accuracy {cells[1]}, loss {cells[2]}, clients ok/failed "
                f"{clients}, {cells[4]} s (elapsed {cells[5]} s)"
                + (f", {aggregation}" if aggregation else ""),
                highlight=False,
                soft_wrap=True,
            )
            return
        self._table.add_row(*cells)
        if report.server_round > 0:
            self._progress.advance(self._task)
        self._live.refresh()
