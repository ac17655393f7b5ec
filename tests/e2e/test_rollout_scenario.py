"""The rollout scenario end to end on the real broker: a good variant promotes, a bad one is caught.

Real pieces: Mosquitto on 127.0.0.1:1883, the store and its signatures, the rollout
controller and its database, signed directives and signed device events, ONNX
Runtime on each device's labelled images. A reduced fleet (120 devices) keeps it
to about half a minute.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fedge.cli import main
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from simulations.data import DEFAULT_DATA_DIR

HAVE_FASHION = (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").exists()


def _broker_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=1):
            return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _broker_answers(),
        reason="needs the Mosquitto broker on 127.0.0.1:1883 (apt-get install mosquitto)",
    ),
    pytest.mark.skipif(
        not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed"
    ),
]


def test_a_good_variant_reaches_the_fleet_and_a_bad_one_is_rolled_back_at_the_canary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    code = main(
        [
            "sim", "rollout", "--devices", "120", "--stages", "10,40,100", "--bake", "0.5",
            "--workdir", str(tmp_path / "work"), "--out", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out

    assert code == 0, printed
    result = json.loads(out.read_text())
    good, bad = result["good"], result["bad"]
    assert (good["state"], good["fraction_reached"], good["exposed_devices"]) == (
        "completed",
        1.0,
        0,
    )
    assert bad["state"] == "rolled_back" and bad["stage_reached"] == 1
    assert "accuracy" in bad["reason"]
    # Never more than the canary fraction ran the bad variant.
    assert 0 < bad["max_exposed_fraction"] <= 0.10
    assert bad["seconds_to_rollback"] is not None
    # Nothing lost or forged on the way: every signed event published was stored once.
    assert result["events_stored"] == result["events_published"]
    assert result["events_rejected"] == 0
    assert "rolled back" in printed or "rolled_back" in printed

    engine = open_database(f"sqlite:///{tmp_path / 'work' / 'home' / 'fedge.db'}")
    try:
        log = AuditLog(engine)
        assert log.verify().ok
        transitions = [
            (e.payload["transition"], e.payload["to"])
            for e in log.iter()
            if e.kind is AuditEventKind.ROLLOUT_TRANSITION
        ]
    finally:
        engine.dispose()
    assert transitions == [
        ("advance", "running"),
        ("advance", "running"),
        ("advance", "completed"),
        ("rollback", "rolled_back"),
    ]
