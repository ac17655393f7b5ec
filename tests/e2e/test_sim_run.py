"""``fedge sim run`` end to end: a real Flower simulation (Ray) through the command line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from secure_agg.encoding import EncodingConfig
from simulations.data import DEFAULT_DATA_DIR
from tests.conftest import make_synthetic_fashion

pytestmark = pytest.mark.slow

HAVE_FASHION = (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").exists()


def _sim_command(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedge",
        "sim",
        "run",
        "--out",
        str(out),
        "--home",
        str(tmp_path / "runs"),
        *extra,
    ]


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "summary.json"
    result = subprocess.run(
        _sim_command(tmp_path, out, "--clients", "3", "--rounds", "2", *extra),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "FEDGE_DATA_DIR": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.read_text())


def _check_run_records(tmp_path: Path, summary: dict[str, Any]) -> None:
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final_accuracy"] == summary["rounds"][-1]["accuracy"]
    assert summary["config"]["num_clients"] == 3
    for entry in summary["rounds"]:
        assert set(entry) >= {"round", "accuracy", "loss", "seconds", "model_sha256"}
        assert entry["replies"] == 3
        assert entry["failures"] == 0
        model = Path(entry["model_path"])
        assert hashlib.sha256(model.read_bytes()).hexdigest() == entry["model_sha256"]

    engine = open_database(f"sqlite:///{tmp_path / 'runs' / 'fedge.db'}")
    try:
        log = AuditLog(engine)
        assert log.verify().ok
        kinds = [event.kind for event in log.iter(run_id=summary["run_id"])]
    finally:
        engine.dispose()
    assert kinds[0] is AuditEventKind.RUN_STARTED
    assert kinds[-1] is AuditEventKind.RUN_COMPLETED
    assert kinds.count(AuditEventKind.MODEL_SAVED) == 3  # initial model + 2 rounds
    assert kinds.count(AuditEventKind.ROUND_COMPLETED) == 2
    # Every round's model (and the initial one, v1) is a signed version in the store.
    assert [r["store_version"] for r in summary["rounds"]] == [2, 3]
    assert kinds.count(AuditEventKind.MODEL_PUBLISHED) == 3
    assert summary["audit"]["head_hash"] is not None


@pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed"
)
def test_three_clients_two_rounds_on_fashion_mnist(tmp_path: Path) -> None:
    result, summary = _run(
        tmp_path, "--train-examples", "6000", "--test-examples", "2000", "--seed", "1"
    )

    _check_run_records(tmp_path, summary)
    # Chance is 0.10; two rounds on 6,000 examples reach about 0.7.
    assert summary["final_accuracy"] > 0.5
    assert summary["initial_accuracy"] < 0.25
    assert "final accuracy" in result.stdout


@dataclass(frozen=True)
class _GeneratedRun:
    data: Path
    home: Path
    summary: dict[str, Any]


GENERATED_OPTIONS = ("--local-epochs", "2")


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory: pytest.TempPathFactory) -> _GeneratedRun:
    """Three clients, two rounds on generated data: checked on its own, and the plaintext
    reference of the secure run (one run where there were two)."""
    root = tmp_path_factory.mktemp("generated")
    data = make_synthetic_fashion(root / "data", train=600, test=200)
    _, summary = _run(root / "plain", "--data-dir", str(data), *GENERATED_OPTIONS)
    return _GeneratedRun(data=data, home=root / "plain", summary=summary)


def test_three_clients_two_rounds_on_generated_data(generated_run: _GeneratedRun) -> None:
    summary = generated_run.summary

    _check_run_records(generated_run.home, summary)
    assert summary["final_accuracy"] > 0.8
    assert summary["data"]["train_examples"] == 600
    assert sum(summary["data"]["client_sizes"]) == 600


def _sigint_as_in_a_terminal() -> None:
    # A shell starts a background job (`pytest ... &`) with SIGINT ignored, and the child
    # inherits that: fedge would rightly ignore the SIGINT below. Ctrl-C in a terminal
    # reaches a foreground process whose SIGINT has its default action.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_run_and_keeps_what_it_did(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=600, test=200)
    out = tmp_path / "summary.json"
    process = subprocess.Popen(
        _sim_command(tmp_path, out, "--clients", "2", "--rounds", "500", "--data-dir", str(data)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,  # noqa: PLW1509 - one signal call, no locks
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if out.exists() and json.loads(out.read_text())["rounds"]:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no round completed within 240 s")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()

    # On failure, say what the interrupted run printed last.
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "fedge: error: interrupted"
    summary = json.loads(out.read_text())
    assert summary["status"] == "interrupted"
    assert 1 <= len(summary["rounds"]) < 500
    engine = open_database(f"sqlite:///{tmp_path / 'runs' / 'fedge.db'}")
    try:
        log = AuditLog(engine)
        kinds = [event.kind for event in log.iter(run_id=summary["run_id"])]
        assert log.verify().ok
    finally:
        engine.dispose()
    assert kinds[-1] is AuditEventKind.RUN_FAILED


def test_secure_aggregation_through_the_cli_matches_plaintext_fedavg(
    generated_run: _GeneratedRun, tmp_path: Path
) -> None:
    plain = generated_run.summary
    common = ("--data-dir", str(generated_run.data), *GENERATED_OPTIONS)
    # Three clients cannot tolerate a dropout at the default security level.
    result, secure = _run(tmp_path / "secure", *common, "--secure-agg", "--secagg-dropout", "0")

    _check_run_records(tmp_path / "secure", secure)
    assert "SecAgg+ (active server)" in " ".join(result.stderr.split())
    round_one = secure["rounds"][0]["secure_aggregation"]
    assert round_one["survivors"] == 3 and round_one["ring_bits"] == 32
    # Keyed in advance: setup and shares in one trip from round 2 on.
    stages = list(secure["rounds"][1]["secure_aggregation"]["stage_seconds"])
    assert stages == ["prekeyed-setup", "masked-input", "consistency", "unmask"]
    # The same clients trained from the same initial model: round 1's secure model is
    # plaintext FedAvg's up to the quantisation error (1/s per coordinate).
    bound = EncodingConfig(clip_range=0.5, max_clients=3, weight_cap=10_000).error_bound
    with (
        np.load(plain["rounds"][0]["model_path"]) as a,
        np.load(secure["rounds"][0]["model_path"]) as b,
    ):
        assert set(a.files) == set(b.files)
        worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)
    assert 0 < worst <= bound + 1e-6


def test_distributed_dp_stops_at_the_round_that_would_exceed_the_budget(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=600, test=200)
    out = tmp_path / "summary.json"
    command = _sim_command(
        tmp_path, out, "--clients", "4", "--rounds", "5", "--data-dir", str(data)
    )
    # 4 clients, 1 of them assumed corrupt: no dropout can be tolerated (--secagg-dropout 0).
    command += ["--dp", "distributed", "--secagg-dropout", "0"]
    command += ["--noise-multiplier", "3.5", "--epsilon", "2"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    privacy = summary["privacy"]
    # Noise shares are sized for the 3 honest clients every device counts on (4 less 1
    # corrupt), so each round spends about rho = 1 / (2 z^2) = 0.041: epsilon about 1.7
    # after two rounds, then about 2.1 > 2.
    assert len(summary["rounds"]) == 2
    assert privacy["epsilon"] <= 2.0 and "would take the run to epsilon" in privacy["stopped"]
    assert "stopped early" in result.stdout
    # Said before the first round, with the multiplier that would fit all five.
    warned = " ".join(result.stdout.split())
    assert "allows 2 of the 5 rounds at noise multiplier 3.5" in warned, warned[-2000:]
    assert "or more fits them all" in warned
    # And that a model this size learns nothing from four clients' noisy mean.
    logged = " ".join((result.stdout + result.stderr).split())
    assert "with 4 clients a round (all surviving) the averaged update" in logged, logged[-2000:]
    engine = open_database(f"sqlite:///{tmp_path / 'runs' / 'fedge.db'}")
    try:
        kinds = [e.kind for e in AuditLog(engine).iter(run_id=summary["run_id"])]
    finally:
        engine.dispose()
    assert kinds.count(AuditEventKind.PRIVACY_SPENT) == 2
    assert AuditEventKind.BUDGET_EXHAUSTED in kinds
    assert kinds[-1] is AuditEventKind.RUN_COMPLETED


def _privacy_events(tmp_path: Path, run_id: str) -> list[Any]:
    engine = open_database(f"sqlite:///{tmp_path / 'runs' / 'fedge.db'}")
    try:
        return [
            e.payload
            for e in AuditLog(engine).iter(run_id=run_id)
            if e.kind is AuditEventKind.PRIVACY_SPENT
        ]
    finally:
        engine.dispose()


def test_central_dp_stops_at_the_round_that_would_exceed_the_budget(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=600, test=200)
    out = tmp_path / "summary.json"
    command = _sim_command(
        tmp_path, out, "--clients", "4", "--rounds", "6", "--data-dir", str(data)
    )
    # The Gaussian mechanism at z = 8: epsilon 0.48, 0.70, 0.87, 1.01, ... at delta 1e-5.
    command += ["--dp", "central", "--noise-multiplier", "8", "--epsilon", "1"]
    command += ["--model-name", "cnn-central-dp"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    privacy = summary["privacy"]
    assert len(summary["rounds"]) == 3
    # Published under its own name, each version signed with the run's DP mode.
    home = str(tmp_path / "runs")
    listed = subprocess.run(
        [sys.executable, "-m", "fedge", "store", "list", "--json", "--home", home],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    versions = json.loads(listed.stdout)
    assert {(v["model"], v["dp_mode"], v["run_outcome"]) for v in versions} == {
        ("cnn-central-dp", "central", "completed")
    }
    assert [v["server_round"] for v in versions] == [0, 1, 2, 3]
    assert privacy["epsilon"] == pytest.approx(0.866, abs=0.002)
    assert "would take the run to epsilon 1.01" in privacy["stopped"]
    assert not privacy["amplification"]["claimed"]
    events = _privacy_events(tmp_path, summary["run_id"])
    assert [e["round"] for e in events] == [1, 2, 3]
    assert all(e["clients_charged"] == 4 and e["noise_std_of_sum"] == 8.0 for e in events)


def test_devices_decline_rounds_past_their_own_budget(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=600, test=200)
    out = tmp_path / "summary.json"
    command = _sim_command(
        tmp_path, out, "--clients", "3", "--rounds", "3", "--data-dir", str(data)
    )
    # Local DP at z = 4 costs a device the Gaussian at z = 2 per round: 2.17, then 3.19.
    command += ["--dp", "local", "--noise-multiplier", "4", "--client-epsilon", "3"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [(r["replies"], r["failures"]) for r in summary["rounds"]] == [(3, 0), (0, 3), (0, 3)]
    # Nobody trained after round 1: the model did not change.
    assert summary["rounds"][1]["model_sha256"] == summary["rounds"][2]["model_sha256"]
    ledgers = sorted(Path(summary["privacy"]["device_ledgers"]).glob("device-*.jsonl"))
    assert len(ledgers) == 3
    for ledger in ledgers:
        [line] = ledger.read_text().splitlines()
        assert json.loads(line)["round"] == 1
    assert summary["privacy"]["max_client_epsilon"] == pytest.approx(2.166, abs=0.01)


def test_adaptive_clipping_under_secure_aggregation_moves_the_clip(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=600, test=200)
    out = tmp_path / "summary.json"
    command = _sim_command(
        tmp_path, out, "--clients", "4", "--rounds", "2", "--data-dir", str(data)
    )
    command += ["--dp", "central", "--secure-agg", "--secagg-dropout", "0", "--adaptive-clip"]
    command += ["--dp-clip", "0.01", "--noise-multiplier", "0.5"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert all(r["secure_aggregation"]["survivors"] == 4 for r in summary["rounds"])
    events = _privacy_events(tmp_path, summary["run_id"])
    # Updates are far longer than 0.01: every bit is 0, so the securely summed count is
    # 0 plus N(0, 1) noise (4 clients: the fraction is 0 +- 0.25), and the clip follows
    # C exp(-0.2 (fraction - 0.5)) from it (upwards unless the noise exceeds 2 sigma).
    assert events[0]["l2_clip"] == 0.01
    for event in events:
        assert abs(event["noisy_unclipped_fraction"]) < 6 * 0.25
        expected = event["l2_clip"] * math.exp(-0.2 * (event["noisy_unclipped_fraction"] - 0.5))
        assert event["next_l2_clip"] == pytest.approx(expected, rel=1e-3)
    assert events[1]["l2_clip"] == events[0]["next_l2_clip"]


def test_sample_level_dp_sgd_reaches_its_target_and_no_more(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=600, test=200)
    out = tmp_path / "summary.json"
    command = _sim_command(
        tmp_path, out, "--clients", "3", "--rounds", "2", "--data-dir", str(data)
    )
    command += ["--dp", "sample", "--epsilon", "3", "--client-epsilon", "3.05"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [(r["replies"], r["failures"]) for r in summary["rounds"]] == [(3, 0), (3, 0)]
    privacy = summary["privacy"]
    assert privacy["level"] == "example" and privacy["mechanism"] == "dp-sgd"
    # Each device chose the noise that reaches epsilon 3 after both rounds (PRV).
    assert 2.5 < privacy["max_client_epsilon"] <= 3.0 + 1e-6
    for ledger in Path(privacy["device_ledgers"]).glob("device-*.jsonl"):
        lines = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert [line["round"] for line in lines] == [1, 2]
        assert all(line["mechanism"] == "dp-sgd" for line in lines)
