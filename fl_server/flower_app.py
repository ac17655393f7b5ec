"""fedge's ServerApp for Flower's own tooling (``flwr run``).

``fedge server start DIR`` is the way fedge runs a deployment; this module lets a
Flower user submit the same federation with ``flwr run . FEDERATION`` to a
SuperLink they run themselves. The run config names the deployment directory
(``fedge server init``), whose configuration, database, store and ledger the
run uses through the same coordinator::

    flwr run . my-federation --run-config 'deployment-dir="/var/lib/fedge"'
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.errors import ConfigError
from fl_server.audit.trust import AuditTrust
from fl_server.coordinator import RunLocation, new_run_id, run_coordinated
from fl_server.deployment import DeploymentLayout, load_config
from fl_server.deployment_plan import build_plan

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the deployment's configured federation on the Grid Flower gives."""
    directory = context.run_config.get("deployment-dir")
    if not isinstance(directory, str) or not directory:
        raise ConfigError(
            "set the run config's deployment-dir to a `fedge server init` directory: "
            "flwr run . FEDERATION --run-config 'deployment-dir=\"DIR\"'"
        )
    layout = DeploymentLayout(Path(directory))
    layout.require_initialised()
    config = load_config(layout.config)
    run_id = new_run_id()
    plan = build_plan(config, layout, run_id)
    run_dir = layout.runs / run_id
    location = RunLocation(
        summary=run_dir / "summary.json",
        models=run_dir / "models",
        db_url=layout.database_url(config),
        store_dir=layout.store,
        audit_dir=AuditTrust.of_home(layout.root).directory,
    )

    def host(server_app: ServerApp) -> None:
        server_app(grid, context)

    run_coordinated(plan, location, host)
