"""The fedge cloud side: ServerApp and workflows, audit log, database, checkpoints."""

from fl_server.federation import (
    CentralEvaluator,
    Evaluation,
    FederationConfig,
    RoundObserver,
    RoundReport,
    make_server_app,
)

__all__ = [
    "CentralEvaluator",
    "Evaluation",
    "FederationConfig",
    "RoundObserver",
    "RoundReport",
    "make_server_app",
]
