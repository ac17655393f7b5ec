"""fedge as a Flower App: `flwr build` packs it, and its apps refuse a run without their paths."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any, cast

import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedge.errors import ConfigError
from fl_client import flower_app as client_module
from fl_server import flower_app as server_module

ROOT = Path(__file__).resolve().parents[2]


def _context(**config: str) -> Context:
    return Context(
        run_id=1, node_id=2, node_config=dict(config), state=RecordDict(), run_config=dict(config)
    )


def test_flwr_build_packs_the_fedge_packages_and_names_its_apps() -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(ROOT)
    assert len(fab) < 10 * 1024 * 1024  # Flower's FAB limit
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "fl_server/flower_app.py" in names and "fl_client/flower_app.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    manifest = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode()
    assert 'serverapp = "fl_server.flower_app:app"' in manifest
    assert isinstance(server_module.app, ServerApp) and isinstance(client_module.app, ClientApp)


def test_the_server_app_needs_a_deployment_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="deployment-dir"):
        server_module.main(cast(Grid, None), _context())
    with pytest.raises(ConfigError, match="no fedge deployment"):
        server_module.main(cast(Grid, None), _context(**{"deployment-dir": str(tmp_path)}))


def test_the_client_app_needs_the_device_and_its_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device-dir"):
        client_module._node_paths(_context(data="x.npz"))
    assert client_module._node_paths(_context(**{"device-dir": "d", "data": "x"})) == ("d", "x")
    with pytest.raises(ConfigError, match="not enrolled"):
        client_module._device_app(str(tmp_path), str(tmp_path / "x.npz"))


def test_the_client_app_names_the_device_and_makes_it_one_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, object]] = []

    def device_app(message: object, context: Context) -> str:
        seen.append(dict(context.node_config))
        return "reply"

    monkeypatch.setattr(client_module, "_device_app", lambda d, p: (device_app, "dev-abc"))
    context = _context(**{"device-dir": "d", "data": "x"})
    assert cast(Any, client_module.train(cast(Any, "message"), context)) == "reply"
    assert seen[0]["device-id"] == "dev-abc"
    assert (seen[0]["partition-id"], seen[0]["num-partitions"]) == (0, 1)
