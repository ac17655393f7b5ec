"""A real fedge deployment on loopback, driven only through the ``fedge`` command line.

One deployment serves the whole module (CI has 2 cores):

1. ``fedge server init`` on free ports; ``fedge server start``; five devices enrol with
   one-time tokens and run ``fedge client start`` on their own 300 examples.
2. Three secure rounds with sample-level DP (DP-SGD on each device under SecAgg+, the
   active threat model). Five devices take part in each round with
   ``secure_aggregation.dropout = 0.1``, which gives k = 4, t = 3: one dropout is
   tolerated. With four sampled devices no neighbourhood tolerates any dropout (the
   assumed corrupt fraction, 10 %, is fixed), so the fifth device is the one that is
   SIGKILLed in the middle of round 3; the round completes with four survivors.
3. The device is revoked while the server is down; the server is started again with
   distributed DP for three rounds of the four remaining devices, which reconnect by
   themselves. Meanwhile every refusal is tried: a reused, an expired and an unknown
   token, a wrong CA fingerprint, the revoked device, a key nobody registered.
4. During round 2 of that run the server is SIGKILLed (its SuperLink and gateway must
   follow) and started again: it resumes the same run, abandons round 2 and charges
   it, and trains round 3.

The tests then read what the run left: summaries, audit trail, privacy ledgers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.deployment_helpers import (
    Fleet,
    lingering_processes,
    set_config,
    wait_for,
    write_stripes,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEVICES = ("d0", "d1", "d2", "d3", "d4")
KILLED = "d4"
EXAMPLES = 300
ROUNDS = 3
SECOND_ROUNDS = 3
CRASHED_IN = 2  # the second run's server is SIGKILLed during this round
# Messages a device gets per secure round, keyed in advance: prekeyed-setup, masked-input,
# consistency (the active threat model), unmask; a run's first round starts with a
# pre-key request too.
SECURE_STAGES = 4
LIFETIME_EPSILON = "50"


@dataclass
class Outcome:
    """What the module's deployment did, for the tests to check."""

    fleet: Fleet
    device_ids: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    first: dict[str, Any] = field(default_factory=dict)
    second: dict[str, Any] = field(default_factory=dict)
    server_codes: list[int] = field(default_factory=list)
    server_leftovers: list[list[str]] = field(default_factory=list)
    killed_in_round: int = 0
    killed_leftovers: list[str] = field(default_factory=list)
    refusals: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    refused_starts: dict[str, tuple[int, str]] = field(default_factory=dict)
    device_codes: dict[str, int] = field(default_factory=dict)
    revoke_output: str = ""
    crash_leftovers: list[str] = field(default_factory=list)


def _summaries(fleet: Fleet) -> dict[str, Path]:
    return {path.parent.name: path for path in (fleet.server_dir / "runs").glob("*/summary.json")}


def _rounds_done(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_gateway(fleet: Fleet, server: subprocess.Popen[bytes]) -> None:
    ca = ssl.create_default_context(cafile=fleet.server_dir / "tls" / "ca.pem")

    def answers() -> bool:
        assert server.poll() is None, fleet.log("server").read_text()[-3000:]
        try:
            return httpx.get(f"{fleet.server_url}/healthz", verify=ca, timeout=2).is_success
        except httpx.HTTPError:
            return False

    wait_for(answers, timeout=90, what="the gateway")


def _new_summary(fleet: Fleet, before: set[str]) -> dict[str, Any]:
    (path,) = [p for run, p in _summaries(fleet).items() if run not in before]
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def _wait_server(fleet: Fleet, server: subprocess.Popen[bytes], outcome: Outcome) -> None:
    code = server.wait(timeout=300)
    assert code == 0, (
        f"fedge server start exited {code}:\n" + fleet.log("server").read_text()[-3000:]
    )
    outcome.server_codes.append(code)
    # The SuperLink and the gateway died with it.
    outcome.server_leftovers.append(lingering_processes(str(fleet.server_dir)))


def _first_run(
    fleet: Fleet, outcome: Outcome, data: dict[str, Path]
) -> dict[str, subprocess.Popen[bytes]]:
    server = fleet.start_server()
    _wait_gateway(fleet, server)
    outcome.tokens = dict(zip(DEVICES, fleet.tokens(len(DEVICES)), strict=True))

    def enrol_and_start(name: str) -> subprocess.Popen[bytes]:
        fleet.fedge(
            "client", "enroll", "--server", fleet.server_url, "--token", outcome.tokens[name],
            "--ca-fingerprint", fleet.fingerprint, "--dir", str(fleet.device_dir(name)),
            "--lifetime-epsilon", LIFETIME_EPSILON,
        )  # fmt: skip
        outcome.device_ids[name] = fleet.device_id(name)
        return fleet.start_device(name, data[name])

    # The devices enrol at once, as a fleet does, and each starts as soon as it is enrolled.
    with ThreadPoolExecutor(max_workers=len(DEVICES)) as pool:
        started = {name: pool.submit(enrol_and_start, name) for name in DEVICES}
        devices = {name: future.result() for name, future in started.items()}
    wait_for(
        lambda: any(_rounds_done(p) >= ROUNDS - 1 for p in _summaries(fleet).values()),
        timeout=300,
        what=f"round {ROUNDS - 1}",
    )
    # Round 3 has begun: pull the plug on one device while it trains (it has received
    # the round's masked-input request). Killed between sending a reply and uploading
    # its objects, it would stall the server's pull of that reply for minutes instead.
    wait_for(
        lambda: _received(fleet, KILLED) >= _through_masked_input(ROUNDS),
        timeout=120,
        what=f"{KILLED}'s masked-input request of round {ROUNDS}",
    )
    devices[KILLED].send_signal(signal.SIGKILL)
    devices[KILLED].wait(timeout=10)
    outcome.killed_in_round = ROUNDS
    marker = str(fleet.device_dir(KILLED))
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not lingering_processes(marker), timeout=20, what="the SuperNode")
    outcome.killed_leftovers = lingering_processes(marker)
    _wait_server(fleet, server, outcome)
    outcome.first = _new_summary(fleet, set())
    return {name: process for name, process in devices.items() if name != KILLED}


def _through_masked_input(round_number: int) -> int:
    """Messages of one run a device has once it holds round ``round_number``'s masked input."""
    return 1 + (round_number - 1) * SECURE_STAGES + 2


def _received(fleet: Fleet, name: str) -> int:
    """How many messages device ``name``'s SuperNode has received (from Flower's log)."""
    log = fleet.device_dir(name) / "logs" / "supernode.log"
    try:
        return log.read_text(errors="replace").count("Received successfully")
    except OSError:
        return 0


def _rogue_device(fleet: Fleet) -> str:
    """A copy of an enrolled device's state with a SuperNode key nobody registered."""
    rogue = fleet.device_dir("rogue")
    shutil.copytree(
        fleet.device_dir("d0"),
        rogue,
        ignore=shutil.ignore_patterns("ledger", "logs", "last-active"),
    )
    key = ec.generate_private_key(ec.SECP384R1())
    (rogue / "supernode.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    return "rogue"


def _refused_start(fleet: Fleet, name: str, data: Path) -> tuple[int, str]:
    # A revoked device sees itself on the signed list at once; a never-registered key is
    # refused after three failed activations (see fl_client.device_runtime).
    code = fleet.start_device(name, data).wait(timeout=180)
    log = fleet.device_dir(name) / "logs" / "supernode.log"
    return code, log.read_text(errors="replace")


def _refusals(
    fleet: Fleet, outcome: Outcome, expired: str, data: Path, enrolled: threading.Event
) -> None:
    """Try every refusal at once (the second run is short); set ``enrolled`` once the
    refused enrolments have their answers (the server must be up for them)."""
    tries = {
        "reused": (outcome.tokens["d0"], fleet.fingerprint),
        "expired": (expired, fleet.fingerprint),
        "unknown": ("fet_" + "A" * 43, fleet.fingerprint),
        "wrong-ca": (fleet.tokens(1)[0], "sha256:" + "0" * 64),
    }
    rogue = _rogue_device(fleet)
    with ThreadPoolExecutor(max_workers=len(tries) + 2) as pool:
        enrolments = {
            name: pool.submit(
                fleet.enrol, f"refused-{name}", token, fingerprint=fingerprint, check=False
            )
            for name, (token, fingerprint) in tries.items()
        }
        starts = {name: pool.submit(_refused_start, fleet, name, data) for name in (KILLED, rogue)}
        try:
            outcome.refusals = {name: future.result() for name, future in enrolments.items()}
        finally:
            enrolled.set()
        outcome.refused_starts = {name: future.result() for name, future in starts.items()}


def _second_run(
    fleet: Fleet,
    outcome: Outcome,
    devices: dict[str, subprocess.Popen[bytes]],
    data: dict[str, Path],
    expired: str,
) -> None:
    """Revoke the killed device; restart the server for distributed DP; try every refusal."""
    before = set(_summaries(fleet))
    outcome.revoke_output = fleet.fedge(
        "server", "revoke", outcome.device_ids[KILLED], "--dir", str(fleet.server_dir),
        "--reason", "lost",
    ).stdout  # fmt: skip
    set_config(
        fleet.server_dir / "fedge-server.toml",
        {
            # A device whose SuperNode was receiving a message when the server is SIGKILLed
            # keeps that task (Flower's SuperNode drops the message without finishing its
            # task) and its executor waits up to 120 s for the message's objects
            # (fl_client.clientapp_runner._PULL_MAX_TIME_S) before it takes the resumed
            # round's: the resumed round must outwait it, or it aborts with that device.
            "federation": {
                "rounds": SECOND_ROUNDS,
                "clients_per_round": 4,
                "min_clients": 4,
                "round_timeout_s": 150.0,
            },
            "secure_aggregation": {"dropout": 0.0},
            "privacy": {"mode": "distributed", "epsilon": 20.0, "noise_multiplier": 1.0},
        },
    )
    # The four remaining devices kept running while the server was down.
    server = fleet.start_server()
    _wait_gateway(fleet, server)
    enrolled = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        refused = pool.submit(_refusals, fleet, outcome, expired, data["d0"], enrolled)
        _crash_and_restart(fleet, outcome, server, before, enrolled)
        refused.result()
    outcome.second = _new_summary(fleet, before)
    for process in devices.values():
        process.send_signal(signal.SIGTERM)
    for name, process in devices.items():
        outcome.device_codes[name] = process.wait(timeout=60)


def _crash_and_restart(
    fleet: Fleet,
    outcome: Outcome,
    server: subprocess.Popen[bytes],
    before: set[str],
    enrolled: threading.Event,
) -> None:
    """SIGKILL the server once round CRASHED_IN - 1 is saved; start it again; wait for the end.

    Not before the refused enrolments have their answers: on a loaded machine they can
    still be in flight by then, and a dead gateway answers none of them.
    """

    def saved() -> bool:
        assert server.poll() is None, fleet.log("server").read_text()[-3000:]
        fresh = [p for run, p in _summaries(fleet).items() if run not in before]
        return bool(fresh) and _rounds_done(fresh[0]) >= CRASHED_IN - 1

    wait_for(saved, timeout=300, what=f"round {CRASHED_IN - 1} of the second run")
    assert enrolled.wait(timeout=180), "the refused enrolments never finished"
    # Into round CRASHED_IN, while the devices train (d0 has its masked-input request):
    # a device killed off mid-transfer would hold that message's task (see above).
    wait_for(
        # The whole first run (its pre-key request and ROUNDS rounds), then this one's.
        lambda: (
            _received(fleet, "d0") >= 1 + ROUNDS * SECURE_STAGES + _through_masked_input(CRASHED_IN)
        ),
        timeout=120,
        what=f"d0's masked-input request of round {CRASHED_IN} of the second run",
    )
    server.send_signal(signal.SIGKILL)  # the supervisor only: its children must follow
    server.wait(timeout=10)
    marker = str(fleet.server_dir)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not lingering_processes(marker), timeout=20, what="the server's children")
    outcome.crash_leftovers = lingering_processes(marker)
    restarted = fleet.start_server()
    _wait_server(fleet, restarted, outcome)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    """Run the module's deployment once (about three minutes on two cores)."""
    fleet = Fleet(tmp_path_factory.mktemp("deployment"))
    outcome = Outcome(fleet=fleet)
    data = {
        name: write_stripes(fleet.root / "data" / f"{name}.npz", EXAMPLES, seed=index)
        for index, name in enumerate(DEVICES)
    }
    try:
        fleet.init_server(
            EXAMPLES,
            {
                "federation": {
                    "rounds": ROUNDS,
                    "min_clients": len(DEVICES),
                    "clients_per_round": len(DEVICES),
                    "round_timeout_s": 45.0,
                },
                "training": {"batch_size": 64, "learning_rate": 0.1},
                "secure_aggregation": {"dropout": 0.1},
                "privacy": {"mode": "sample", "epsilon": 3.0},
            },
        )
        expired = fleet.tokens(1, expires="1s")[0]
        devices = _first_run(fleet, outcome, data)
        _second_run(fleet, outcome, devices, data, expired)
        yield outcome
    finally:
        fleet.close()


def _audit(fleet: Fleet) -> list[dict[str, Any]]:
    return fleet.audit_kinds()


def test_three_secure_dp_rounds_improve_the_model(deployment: Outcome) -> None:
    first = deployment.first
    assert first["status"] == "completed", first.get("error")
    assert [r["round"] for r in first["rounds"]] == [1, 2, 3]
    assert first["final_accuracy"] > first["initial_accuracy"] + 0.2
    for row in first["rounds"]:
        secure = row["secure_aggregation"]
        assert secure["sampled"] == len(DEVICES)
        assert (secure["degree"], secure["threshold"]) == (4, 3)
    assert first["privacy"]["mechanism"] == "dp-sgd"
    print("round seconds:", [r["seconds"] for r in first["rounds"]], "accuracy:",
          [first["initial_accuracy"]] + [r["accuracy"] for r in first["rounds"]])  # fmt: skip


def test_a_device_killed_mid_round_drops_out_and_the_round_completes(
    deployment: Outcome,
) -> None:
    rounds = {r["round"]: r for r in deployment.first["rounds"]}
    killed = rounds[deployment.killed_in_round]["secure_aggregation"]
    assert killed["sampled"] == len(DEVICES)
    assert killed["survivors"] == len(DEVICES) - 1
    assert killed["aborted"] is None
    for earlier in range(1, deployment.killed_in_round):
        assert rounds[earlier]["secure_aggregation"]["survivors"] == len(DEVICES)
    # Its SuperNode died with it (SIGTERM from the kernel, PR_SET_PDEATHSIG).
    assert deployment.killed_leftovers == []


def test_every_round_is_audited_charged_and_the_chain_verifies(deployment: Outcome) -> None:
    fleet = deployment.fleet
    records = _audit(fleet)
    for summary in (deployment.first, deployment.second):
        run = summary["run_id"]
        rounds = [r["round"] for r in summary["rounds"]]
        completed = [r["payload"]["round"] for r in records
                     if r["kind"] == "round.completed" and r["run_id"] == run]  # fmt: skip
        spent = [r["payload"]["round"] for r in records
                 if r["kind"] == "privacy.spent" and r["run_id"] == run]  # fmt: skip
        which = "first" if summary is deployment.first else "second"
        # On failure, say which run and what its rounds did (an aborted round is not charged).
        story = f"{which} run: rounds {json.dumps(summary['rounds'], default=str)[:4000]}"
        assert completed == rounds, story
        # The crashed round was abandoned but charged: spend is recorded for every round.
        expected = list(range(1, len(rounds) + 1 + (summary is deployment.second)))
        assert spent == expected, story
    verify = fleet.fedge("audit", "verify", "--home", str(fleet.server_dir))
    assert verify.returncode == 0
    # Distributed DP: the server's ledger charges the run once per round.
    ledger = fleet.fedge_json("ledger", "show", "--home", str(fleet.server_dir))
    assert ledger["run_id"] == deployment.second["run_id"]
    assert [e["round"] for e in ledger["entries"]] == list(range(1, SECOND_ROUNDS + 1))
    epsilons = [e["epsilon"] for e in ledger["entries"]]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # never under-counted
    # Sample-level DP: each device's epsilon is known only to the device (its own ledger);
    # under secure aggregation the server records the round but charges no number.
    first = fleet.fedge_json(
        "ledger", "show", "--home", str(fleet.server_dir), "--run-id", deployment.first["run_id"]
    )
    assert first["entries"] == []


def _device_rounds(fleet: Fleet, name: str, device_id: str) -> list[int]:
    path = fleet.device_dir(name) / "ledger" / f"device-{device_id}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert all(row["mechanism"] for row in rows)
    return [int(row["round"]) for row in rows]


def test_one_identity_names_a_device_everywhere(deployment: Outcome) -> None:
    fleet = deployment.fleet
    nodes = {n["device_id"]: n for n in fleet.fedge_json("server", "nodes", str(fleet.server_dir))}
    audit = _audit(fleet)
    enrolled = {r["payload"]["device_id"] for r in audit if r["kind"] == "device.enrolled"}
    second = {r["round"]: r["secure_aggregation"]["survivors"] for r in deployment.second["rounds"]}
    charged = dict.fromkeys(second, 0)
    for name, device_id in deployment.device_ids.items():
        assert device_id in nodes and device_id in enrolled
        record = json.loads((fleet.device_dir(name) / "device.json").read_text())
        assert record["node_id"] == nodes[device_id]["node_id"]
        rounds = _device_rounds(fleet, name, device_id)
        expected = list(range(1, ROUNDS + 1))
        if name == KILLED:
            assert rounds[: ROUNDS - 1] == expected[: ROUNDS - 1]
            assert nodes[device_id]["status"] == "revoked"
        else:
            assert rounds[:ROUNDS] == expected
            # Second run: round CRASHED_IN may or may not have reached the device's ledger,
            # and a device whose SuperNode still held the crashed run's task can miss the
            # first resumed round (the round goes on without it); nothing else is charged.
            later = set(rounds[ROUNDS:]) - {CRASHED_IN}
            assert 1 in later and later <= set(second), (name, rounds)
            for server_round in later:
                charged[server_round] += 1
            assert nodes[device_id]["status"] == "enrolled"
    # Every survivor of a second-run round charged itself for it in its own ledger.
    assert all(charged[r] >= survivors for r, survivors in second.items()), (charged, second)


def test_refused_enrolments_say_why_in_one_line_and_leave_nothing(deployment: Outcome) -> None:
    fleet = deployment.fleet
    reasons = {
        "reused": "refused the enrolment",
        "expired": "refused the enrolment",
        "unknown": "refused the enrolment",
        "wrong-ca": "does not match --ca-fingerprint",
    }
    for name, expected in reasons.items():
        result = deployment.refusals[name]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0, name
        assert len(lines) == 1 and expected in lines[0], (name, result.stderr)
        assert not fleet.device_dir(f"refused-{name}").exists(), name
    nodes = fleet.fedge_json("server", "nodes", str(fleet.server_dir))
    assert len(nodes) == len(DEVICES)


def test_revoked_and_unregistered_devices_are_refused(deployment: Outcome) -> None:
    assert deployment.device_ids[KILLED] in deployment.revoke_output
    for name in (KILLED, "rogue"):
        code, log = deployment.refused_starts[name]
        assert code != 0, name
        assert "Failed to activate SuperNode" in log, (name, log[-2000:])
    second = deployment.second
    assert second["status"] == "completed", second.get("error")
    assert second["rounds"][0]["secure_aggregation"]["sampled"] == len(DEVICES) - 1


def test_a_killed_server_resumes_its_run_and_never_undercounts(deployment: Outcome) -> None:
    second = deployment.second
    assert second["status"] == "completed", second.get("error")
    assert [r["round"] for r in second["rounds"]] == [
        r for r in range(1, SECOND_ROUNDS + 1) if r != CRASHED_IN
    ]
    # Every round it trained completed with every device (a device that leaves a round of
    # four aborts it: no dropout is tolerated here).
    aborted = {r["round"]: r["secure_aggregation"]["aborted"] for r in second["rounds"]}
    assert aborted == dict.fromkeys(aborted), aborted
    resumed = [
        r["payload"] for r in _audit(deployment.fleet)
        if r["kind"] == "run.resumed" and r["run_id"] == second["run_id"]
    ]  # fmt: skip
    assert resumed == [resumed[0] | {"after_round": CRASHED_IN - 1, "abandoned_round": CRASHED_IN}]
    assert resumed[0]["subjects_charged_for_abandoned_round"] >= 1
    # The SuperLink and the gateway died with the SIGKILLed supervisor.
    assert deployment.crash_leftovers == []


def test_no_process_is_left_behind(deployment: Outcome) -> None:
    assert deployment.server_codes == [0, 0]
    assert deployment.server_leftovers == [[], []]
    assert sorted(deployment.device_codes) == [d for d in DEVICES if d != KILLED]
    assert set(deployment.device_codes.values()) == {0}
    assert lingering_processes(str(deployment.fleet.root)) == []
