"""Rendered reports: HTML in headless Chromium, PDF through pypdf, the CLI, the schema contract."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from matplotlib.image import imread
from typer.testing import CliRunner

from fl_server.reports import SECTIONS, model
from fl_server.reports.cli import report_command, validate_report
from tests.unit.fl_server.reports.conftest import RUN, Populated

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium (Debian's chromium, installed by .ci/run) missing"
)


def _cli(*args: str) -> Any:
    app = typer.Typer()
    app.command("report")(report_command)

    @app.callback()
    def _root() -> None:
        """Mount point, as `fedge audit` will be."""

    return CliRunner().invoke(app, ["report", *args])


def _write(populated: Populated, tmp_path: Path, fmt: str) -> Path:
    out = tmp_path / f"report.{fmt}"
    result = _cli("--run", RUN, "--format", fmt, "--out", str(out), "--db-url", populated.url)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    return out


@needs_chromium
def test_the_html_renders_in_headless_chromium(populated: Populated, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    page = _write(populated, tmp_path, "html")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000
    assert (pixels < 0.9).mean() > 0.01  # text, tables and plots: not a blank page
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for heading in SECTIONS:
        assert f">{heading}</h2>" in dom
    assert dom.count("data:image/png;base64,") == 3  # epsilon, accuracy, participation


def test_the_pdf_opens_and_holds_every_heading(populated: Populated, tmp_path: Path) -> None:
    from pypdf import PdfReader

    result = _cli(
        "--run", RUN, "--format", "pdf", "--out", str(tmp_path / "r.pdf"), "--db-url", populated.url
    )
    assert result.exit_code == 0, result.output
    reader = PdfReader(tmp_path / "r.pdf")
    assert f"({len(reader.pages)} pages)" in result.output
    assert len(reader.pages) >= 1
    text = " ".join(" ".join((page.extract_text() or "").split()) for page in reader.pages)
    for heading in SECTIONS:
        assert heading in text


def test_the_json_validates_and_is_written_atomically(populated: Populated, tmp_path: Path) -> None:
    out = _write(populated, tmp_path, "json")
    document = json.loads(out.read_text())
    validate_report(document)
    assert document["report_kind"] == "run"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left behind
    fleet = tmp_path / "fleet.json"
    result = _cli(
        "--fleet",
        "--since",
        "2020-01-01",
        "--format",
        "json",
        "--out",
        str(fleet),
        "--db-url",
        populated.url,
    )
    assert result.exit_code == 0, result.output
    validate_report(json.loads(fleet.read_text()))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--run", "nope"), "run 'nope' is not recorded"),
        (("--fleet", "--since", "yesterday"), "--since 'yesterday' is not a date"),
        (("--fleet", "--since", "2026-02-01", "--until", "2026-01-01"), "is not before --until"),
        (("--out-dir",), None),
    ],
)
def test_bad_arguments_are_one_clear_error(
    populated: Populated, tmp_path: Path, args: tuple[str, ...], message: str | None
) -> None:
    if message is None:
        result = _cli("--out", str(tmp_path / "missing" / "r.json"), "--db-url", populated.url)
        message = "is not a directory"
    else:
        result = _cli(*args, "--out", str(tmp_path / "r.json"), "--db-url", populated.url)
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert not (tmp_path / "r.json").exists()


def test_no_database_is_created(tmp_path: Path) -> None:
    result = _cli("--out", str(tmp_path / "r.json"), "--db-url", f"sqlite:///{tmp_path}/no.db")
    assert result.exit_code != 0 and "no fedge database" in str(result.exception)
    assert not (tmp_path / "no.db").exists()


def _schema_of(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _schema_of(next(a for a in args if a is not type(None)), defs)
        if isinstance(inner.get("type"), str):
            return {**inner, "type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if tp in simple:
        return {"type": simple[tp]}
    if origin is tuple:
        return {"type": "array", "items": _schema_of(args[0], defs)}
    if origin is Mapping:
        if args[1] is Any:
            return {"type": "object"}
        return {"type": "object", "additionalProperties": _schema_of(args[1], defs)}
    assert isinstance(tp, type) and dataclasses.is_dataclass(tp), tp
    name = tp.__name__
    if name not in defs:
        defs[name] = None
        hints = typing.get_type_hints(tp, vars(model))
        fields = dataclasses.fields(tp)
        defs[name] = {
            "properties": {f.name: _schema_of(hints[f.name], defs) for f in fields},
            "required": [f.name for f in fields],
        }
    return {"$ref": f"#/$defs/{name}"}


def test_the_schema_in_the_repo_describes_the_document() -> None:
    schema = json.loads((Path(model.__file__).with_name("schema.json")).read_text(encoding="utf-8"))
    defs: dict[str, Any] = {}
    _schema_of(model.RunReport, defs)
    _schema_of(model.FleetReport, defs)
    assert set(schema["$defs"]) == set(defs)
    for name, expected in defs.items():
        stored = schema["$defs"][name]
        assert stored["required"] == expected["required"], name
        assert stored["additionalProperties"] is False, name
        for field, shape in expected["properties"].items():
            if field not in {"report_kind", "schema_version"}:
                assert stored["properties"][field] == shape, f"{name}.{field}"
    assert np.all([name in schema["$defs"] for name in ("RunReport", "FleetReport")])


def test_a_sample_level_run_states_the_devices_epsilon_and_renders_without_an_epsilon_plot(
    tmp_path: Path,
) -> None:
    from fl_server.audit import AuditEventKind, AuditLog
    from fl_server.audit.verify import verify_trail
    from fl_server.db import open_database
    from fl_server.reports import build_fleet_report, build_run_report, verification_of
    from fl_server.reports.render_html import render_html
    from tests.unit.fl_server.reports.conftest import sim_config

    # DP-SGD on the devices under secure aggregation: the server ledger charges no one; the
    # devices' own ledgers state the epsilon, recorded at the run's end (as make demo runs).
    engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
    audit = AuditLog(engine)
    audit.append(
        AuditEventKind.RUN_STARTED,
        {"config": sim_config(dp="sample", epsilon=3.0), "config_sha256": "0" * 64},
        run_id="run-s",
    )
    audit.append(
        AuditEventKind.ROUND_COMPLETED,
        {"round": 1, "accuracy": 0.7, "loss": 1.0, "replies": 4, "failures": 0},
        run_id="run-s",
    )
    audit.append(
        AuditEventKind.RUN_COMPLETED,
        {"rounds": 1, "privacy": {"mechanism": "dp-sgd", "max_device_epsilon": 2.875}},
        run_id="run-s",
    )
    verification = verification_of(verify_trail(engine))
    report = build_run_report(engine, run_id="run-s", verification=verification)
    fleet = build_fleet_report(engine, since=None, until=None, verification=verification)
    engine.dispose()

    html = render_html(report)

    assert report.differential_privacy.device_epsilon == 2.875
    assert report.differential_privacy.epsilon_total is None
    assert "Worst device epsilon" in html and "2.875" in html
    assert "within budget" in report.differential_privacy.budget_status
    assert any("worst device epsilon 2.875" in s for s in report.summary.statements)
    assert (fleet.runs[0].device_epsilon, fleet.runs[0].participants) == (2.875, 4)
