"""The command line: help, version, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_synthetic_fashion


def _fedge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, "COLUMNS": "100", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args],
        capture_output=True,
        text=True,
        env=merged,
        timeout=300,
        check=False,
    )


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedge: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_help_lists_the_command_groups() -> None:
    result = _fedge("--help")

    assert result.returncode == 0
    assert "sim" in result.stdout
    assert "version" in result.stdout


def test_sim_run_help_documents_the_flags() -> None:
    result = _fedge("sim", "run", "--help")

    assert result.returncode == 0
    for flag in (
        "--clients",
        "--rounds",
        "--seed",
        "--out",
        "--data-dir",
        "--alpha",
        "--client-lifetime-epsilon",
    ):
        assert flag in result.stdout


def test_version_prints_the_package_version() -> None:
    result = _fedge("version")

    assert result.returncode == 0
    assert result.stdout.startswith("fedge 0.1.0")


def test_unknown_flag(tmp_path: Path) -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--bogus"), r"No such option '--bogus'.*see 'fedge sim run --help'"
    )


def test_zero_clients() -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--clients", "0"), r"--clients.*0 is not in the range x>=1"
    )


def test_non_positive_alpha(tmp_path: Path) -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--alpha", "0", "--runs-dir", str(tmp_path)),
        r"alpha must be > 0, got 0.0",
    )


def test_unknown_partition_mode() -> None:
    _assert_one_clear_line(
        _fedge("sim", "run", "--partition", "random"), r"--partition.*'random' is not one of"
    )


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    result = _fedge("sim", "run", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path))

    _assert_one_clear_line(result, r"does not exist.*apt-get install dataset-fashion-mnist")


def test_corrupt_data_is_reported(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data")
    (data / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")

    result = _fedge("sim", "run", "--data-dir", str(data), "--runs-dir", str(tmp_path))

    _assert_one_clear_line(result, r"cannot read .*train-labels.*corrupt")


def test_more_clients_than_examples(tmp_path: Path) -> None:
    data = make_synthetic_fashion(tmp_path / "data", train=20, test=10)

    result = _fedge(
        "sim", "run", "--clients", "50", "--data-dir", str(data), "--runs-dir", str(tmp_path)
    )

    _assert_one_clear_line(result, r"cannot split 20 examples across 50 clients")


def test_data_dir_from_the_environment(tmp_path: Path) -> None:
    result = _fedge(
        "sim",
        "run",
        "--runs-dir",
        str(tmp_path),
        env={"FEDGE_DATA_DIR": str(tmp_path / "from-env")},
    )

    _assert_one_clear_line(result, r"from-env does not exist")


def _audit_db(tmp_path: Path) -> str:
    from fl_server.audit import AuditEventKind, AuditLog
    from fl_server.db import open_database

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = open_database(url)
    log = AuditLog(engine)
    log.append(AuditEventKind.RUN_STARTED, {"config_sha256": "ab"}, run_id="run-1")
    log.append(AuditEventKind.ROUND_COMPLETED, {"round": 1, "accuracy": 0.5}, run_id="run-1")
    log.append(AuditEventKind.RUN_COMPLETED, {"rounds": 1}, run_id="run-1")
    engine.dispose()
    return url


def test_audit_verify_and_list(tmp_path: Path) -> None:
    url = _audit_db(tmp_path)

    verified = _fedge("audit", "verify", "--db-url", url)
    listed = _fedge("audit", "list", "--db-url", url, "--last", "2")

    assert verified.returncode == 0
    report = verified.stdout.strip().splitlines()
    assert re.match(r"audit chain verified: 3 records, head [0-9a-f]{64}$", report[0])
    # No checkpoint was ever signed in this database: the output says what that leaves open.
    assert report[-1].startswith("warning: no signed checkpoint was checked")
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "round.completed" in lines[0]
    assert "accuracy=0.5" in lines[0]
    assert "run.completed" in lines[1]


def test_audit_verify_names_the_tampered_record(tmp_path: Path) -> None:
    import sqlite3

    url = _audit_db(tmp_path)
    with sqlite3.connect(tmp_path / "audit.db") as connection:
        connection.execute("UPDATE audit_events SET payload = '{\"round\":7}' WHERE seq = 2")

    _assert_one_clear_line(
        _fedge("audit", "verify", "--db-url", url),
        r"audit trail broken at record 2: record 2 was modified",
    )


def test_bad_database_url_is_one_line() -> None:
    _assert_one_clear_line(_fedge("audit", "verify", "--db-url", "nonsense://"), r"database URL")


def test_ledger_show_prints_a_runs_spending_round_by_round(tmp_path: Path) -> None:
    from fl_server.db import open_database
    from fl_server.ledger import PrivacyLedger, RoundSpend

    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    engine = open_database(url)
    try:
        ledger = PrivacyLedger(engine)
        for server_round in (1, 2):
            spend = RoundSpend(mechanism="ddg", rho=0.05)
            ledger.record("run-x", server_round, spend, delta=1e-5)
            charged = {"7": spend} if server_round == 1 else {"7": spend, "9": spend}
            ledger.record_many("run-x", server_round, charged, delta=1e-5)
    finally:
        engine.dispose()

    shown = _fedge("ledger", "show", "--db-url", url)
    empty = _fedge("ledger", "show", "--db-url", f"sqlite:///{tmp_path / 'empty.db'}")

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "run run-x"
    assert [line.split()[:2] for line in lines[2:4]] == [["run", "1"], ["run", "2"]]
    assert "(1e-05)" in lines[3]
    # Client 7 took part twice, client 9 once: 7 is the worst.
    assert lines[4].startswith("clients charged: 2;") and "(client 7)" in lines[4]
    _assert_one_clear_line(empty, "no fedge database at .*empty.db")
    assert not (tmp_path / "empty.db").exists()  # read-only: nothing created
    one = _fedge("ledger", "show", "--db-url", url, "--client", "9").stdout.splitlines()
    assert [line.split()[:2] for line in one[2:]] == [["9", "2"]]
    every = _fedge("ledger", "show", "--db-url", url, "--all").stdout.splitlines()
    assert len(every) == 2 + 2 + 3 + 1


def test_ledger_show_subject_prints_a_clients_runs_and_lifetime_epsilon(tmp_path: Path) -> None:
    from fl_server.db import open_database
    from fl_server.ledger import PrivacyLedger, RoundSpend
    from strategies.accounting import GaussianSteps, spent_epsilon

    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    ddg = RoundSpend(mechanism="distributed-ddg", rho=0.05)
    central = RoundSpend(
        mechanism="central-gaussian",
        gaussian=GaussianSteps(noise_multiplier=2.0, sample_rate=1.0, steps=1),
    )
    engine = open_database(url)
    try:
        ledger = PrivacyLedger(engine)
        for server_round in (1, 2):
            ledger.record_many("run-a", server_round, {"sim-device-3": ddg}, delta=1e-5)
        ledger.record_many(
            "run-b", 1, {"sim-device-3": central, "sim-device-4": central}, delta=1e-5
        )
    finally:
        engine.dispose()

    shown = _fedge("ledger", "show", "--db-url", url, "--subject", "sim-device-3")
    never = _fedge("ledger", "show", "--db-url", url, "--subject", "nobody")

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "subject sim-device-3"
    assert [line.split()[:3] for line in lines[2:4]] == [
        ["run-a", "2", "distributed-ddg"],
        ["run-b", "1", "central-gaussian"],
    ]
    assert lines[3].endswith(f"{spent_epsilon([central], delta=1e-5):.4f} (1e-05)")
    lifetime = spent_epsilon([ddg, ddg, central], delta=1e-5)
    assert lines[4] == f"lifetime epsilon {lifetime:.4f} (delta 1e-05) over 2 runs, 3 rounds"
    assert never.stdout.strip() == "client nobody was never charged"
    _assert_one_clear_line(
        _fedge("ledger", "show", "--db-url", url, "--subject", "run"),
        "'run' is the run-level subject",
    )
    _assert_one_clear_line(
        _fedge("ledger", "show", "--db-url", url, "--subject", "x", "--all"),
        "--subject.*drop --run-id, --client and --all",
    )


def test_distributed_dp_without_a_valid_delta_is_one_clear_line() -> None:
    _assert_one_clear_line(_fedge("sim", "run", "--dp", "distributed", "--delta", "2"), "delta")


def test_store_commands_list_verify_tag_export_and_gc(tmp_path: Path) -> None:
    from fl_server.db import open_database
    from fl_server.store.blobs import FileBlobStore
    from fl_server.store.keys import StoreKey
    from fl_server.store.store import ModelStore, NewArtefact

    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    store_dir = tmp_path / "store"
    engine = open_database(url)
    try:
        store = ModelStore(
            engine, FileBlobStore(store_dir), StoreKey.load_or_create(store_dir / "store-key.pem")
        )
        for tag in (b"1", b"2", b"3"):
            store.publish("cnn", [NewArtefact(name="weights.npz", data=b"w" + tag)])
        digest = store.get("cnn", 3).manifest.artefacts[0].digest
    finally:
        engine.dispose()
    env = {"FEDGE_DB_URL": url, "FEDGE_STORE_DIR": str(store_dir)}

    listed = _fedge("store", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [
        ["cnn", "1"],
        ["cnn", "2"],
        ["cnn", "3"],
    ]
    assert _fedge("store", "verify", "cnn", "latest", env=env).returncode == 0
    # Published by hand (no run): the release policy refuses production without an override.
    refused = _fedge("store", "tag", "cnn", "production", "1", env=env)
    _assert_one_clear_line(refused, r"cnn v1 records no run \(published by hand\)")
    tagged = _fedge("store", "tag", "cnn", "production", "1", "--override", "fixture", env=env)
    assert tagged.stdout.splitlines()[0] == "cnn production -> v1"
    exported = _fedge("store", "export", "cnn", "production", str(tmp_path / "out"), env=env)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "out" / "weights.npz").read_bytes() == b"w1"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["manifest"]["version"] == 1
    gc = _fedge("store", "gc", "--keep-last", "1", env=env)
    # v2 goes; v1 is aliased.
    assert gc.stdout.strip() == "deleted 1 versions, 0 objects and 0 stale temporary files"
    # The public key devices trust: the one the manifests verify with.
    printed = _fedge("store", "key", "--out", str(tmp_path / "store.pub"), env=env)
    assert printed.returncode == 0, printed.stderr
    public = bytes.fromhex((tmp_path / "store.pub").read_text().strip())
    assert public == StoreKey.load_or_create(store_dir / "store-key.pem").public_key_bytes()
    assert printed.stdout.startswith(public.hex())

    # A corrupted object: verify fails with one clear line and exit status 1.
    target = store_dir / "objects" / digest[:2] / digest
    target.chmod(0o644)
    target.write_bytes(b"tampered")
    _assert_one_clear_line(_fedge("store", "verify", "cnn", "3", env=env), "did not verify")
    _assert_one_clear_line(_fedge("store", "show", "cnn", "../x", env=env), "no alias")
