"""Compliance reports from the audit trail, the privacy ledger, the store and the registry."""

from fl_server.reports.builder import build_fleet_report, build_run_report, verification_of
from fl_server.reports.model import SECTIONS, FleetReport, RunReport

__all__ = [
    "SECTIONS",
    "FleetReport",
    "RunReport",
    "build_fleet_report",
    "build_run_report",
    "verification_of",
]
