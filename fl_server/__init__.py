"""The fedge cloud side: ServerApp and workflows, audit log, database, checkpoints."""

from fl_server.dp_strategy import DifferentialPrivacy
from fl_server.federation import (
    CentralEvaluator,
    Evaluation,
    FederationConfig,
    RoundObserver,
    RoundReport,
    make_server_app,
)
from fl_server.privacy import ServerDp
from fl_server.spend import LedgerSink, SpendSink

__all__ = [
    "CentralEvaluator",
    "DifferentialPrivacy",
    "Evaluation",
    "FederationConfig",
    "LedgerSink",
    "RoundObserver",
    "RoundReport",
    "ServerDp",
    "SpendSink",
    "make_server_app",
]
