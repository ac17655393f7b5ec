"""Render a report as PDF: WeasyPrint over the same self-contained HTML."""

from __future__ import annotations

from fl_server.reports.model import FleetReport, RunReport

__all__ = ["render_pdf"]


def render_pdf(report: RunReport | FleetReport) -> tuple[bytes, int]:
    """Return the report as PDF bytes and its page count.

    The HTML loads nothing from outside (inline CSS, ``data:`` images), so
    WeasyPrint fetches no URL while rendering.
    """
    from weasyprint import HTML  # type: ignore[import-untyped]

    from fl_server.reports.render_html import render_html

    document = HTML(string=render_html(report), base_url=None).render()
    data = document.write_pdf()
    assert isinstance(data, bytes)
    return data, len(document.pages)
