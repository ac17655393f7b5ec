"""Render a report as one self-contained HTML page (Jinja2; inline CSS and PNG plots).

The page loads nothing: styles are inlined, plots are ``data:`` URIs, and the
template autoescapes every value, so a stored payload (a device name, an
error message) cannot inject markup into the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fl_server.reports.model import FleetReport, RunReport

if TYPE_CHECKING:
    from jinja2 import Environment

__all__ = ["render_html"]

_TEMPLATES = Path(__file__).with_name("templates")


def _environment() -> Environment:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    return Environment(
        loader=FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(report: RunReport | FleetReport) -> str:
    """Return the report as a self-contained HTML document."""
    environment = _environment()
    if isinstance(report, FleetReport):
        return environment.get_template("fleet.html.j2").render(r=report, plots={})
    from fl_server.reports.plots import run_plots

    return environment.get_template("report.html.j2").render(r=report, plots=run_plots(report))
