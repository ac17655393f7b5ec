"""Read-only commands create nothing; bad input is one ``fedge: error:`` line, never a traceback."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedge.cli import main
from tests.unit.fedge.test_cli import _audit_db, _fedge

KEY = "ab" * 32
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``fedge ARGS`` in this process; return the exit status, stdout and stderr."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, pattern: str) -> None:
    """Assert that stderr is one ``fedge: error:`` line matching ``pattern``, no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedge: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def publish_store(root: Path) -> dict[str, str]:
    """A store with two versions of ``cnn`` under ``root``; the env naming it."""
    from fl_server.db import open_database
    from fl_server.store.blobs import FileBlobStore
    from fl_server.store.keys import StoreKey
    from fl_server.store.store import ModelStore, NewArtefact

    url = f"sqlite:///{root / 'fedge.db'}"
    engine = open_database(url)
    try:
        store = ModelStore(
            engine,
            FileBlobStore(root / "store"),
            StoreKey.load_or_create(root / "store" / "store-key.pem"),
        )
        for tag in (b"1", b"2"):
            store.publish("cnn", [NewArtefact(name="weights.npz", data=b"w" + tag)])
        store.tag("cnn", "production", 1)
    finally:
        engine.dispose()
    return {"FEDGE_DB_URL": url, "FEDGE_STORE_DIR": str(root / "store")}


# --- read-only commands on a home that does not exist -------------------------------


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["store", "key"], r"no model store at .*fedge-home/store \(no store-key.pem\)"),
        (["store", "list"], r"no fedge database at .*fedge-home/fedge.db; run `fedge"),
        (["store", "variants", "cnn"], r"no fedge database at"),
        (["store", "verify", "cnn"], r"no fedge database at"),
        (["store", "show", "cnn"], r"no fedge database at"),
        (["audit", "verify"], r"no fedge database at .*fedge-home/fedge.db"),
        (["audit", "list"], r"no fedge database at"),
        (["ledger", "show"], r"no fedge database at"),
        (["client", "ledger"], r"no device ledgers: .*fedge-home/devices does not exist"),
        (["client", "models", "list", "--store-key", KEY, "--json"], None),
    ],
)
def test_read_only_commands_create_nothing(
    capsys: pytest.CaptureFixture[str], fedge_home: Path, args: list[str], pattern: str | None
) -> None:
    code, out, err = run_cli(capsys, *args)

    if pattern is None:  # an empty cache lists as empty
        assert code == 0 and json.loads(out) == []
    else:
        assert code == 1
        assert_one_error_line(err, pattern)
    assert not fedge_home.exists()


def test_an_explicit_missing_database_is_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'nowhere' / 'fedge.db'}"

    code, _, err = run_cli(capsys, "audit", "list", "--db-url", url)

    assert code == 1
    assert_one_error_line(err, "no fedge database at .*nowhere/fedge.db")
    assert not (tmp_path / "nowhere").exists()


def test_store_key_on_a_database_without_a_key_creates_none(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = publish_store(tmp_path)
    (tmp_path / "store" / "store-key.pem").unlink()

    code, _, err = run_cli(capsys, "store", "list", "--db-url", env["FEDGE_DB_URL"])

    assert code == 1
    assert_one_error_line(err, r"no model store at .*\(no store-key.pem\)")
    assert not (tmp_path / "store" / "store-key.pem").exists()


# --- bad input -----------------------------------------------------------------------


def test_sim_run_into_a_runs_dir_that_is_a_file(tmp_path: Path, fedge_home: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("")

    result = _fedge("sim", "run", "--runs-dir", str(target))

    assert result.returncode == 1
    assert_one_error_line(result.stderr, r"--runs-dir .*a-file is not a directory")
    assert not fedge_home.exists()  # no database: run.started was never logged


def test_sim_run_with_an_unwritable_out_stops_before_the_run_starts(
    tmp_path: Path, fedge_home: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    result = _fedge("sim", "run", "--out", str(blocker / "summary.json"))

    assert result.returncode == 1
    assert_one_error_line(result.stderr, r"--out .*a-file/summary.json: .*a-file is not a dir")
    assert not fedge_home.exists()  # no database: run.started was never logged


@pytest.mark.skipif(AS_ROOT, reason="root writes through chmod 000")
def test_sim_run_with_a_read_only_out_directory(tmp_path: Path, fedge_home: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)

    result = _fedge("sim", "run", "--out", str(locked / "summary.json"))

    assert result.returncode == 1
    assert_one_error_line(result.stderr, r"--out .*locked/summary.json: cannot write in")
    assert not fedge_home.exists()


def test_client_install_of_a_file_instead_of_a_bundle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(b"not a directory")
    cache = tmp_path / "cache"

    code, _, err = run_cli(
        capsys, "client", "models", "install", str(bundle), "--store-key", KEY,
        "--cache-dir", str(cache),
    )  # fmt: skip

    assert code == 1
    assert_one_error_line(err, r"bundle .*bundle.tar is not a directory")
    assert not cache.exists()


def test_client_install_of_a_manifest_nested_too_deeply(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    cache = tmp_path / "cache"

    code, _, err = run_cli(
        capsys, "client", "models", "install", str(bundle), "--store-key", KEY,
        "--cache-dir", str(cache),
    )  # fmt: skip

    assert code == 1
    assert_one_error_line(err, r"manifest.json is not a signed manifest: nested too deeply")
    assert not cache.exists()


def test_a_store_key_that_is_a_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(
        capsys, "client", "models", "list", "--store-key", str(tmp_path)
    )  # fmt: skip

    assert code == 1
    assert_one_error_line(err, r"--store-key .* is a directory")


@pytest.mark.skipif(AS_ROOT, reason="root reads through chmod 000")
def test_an_unreadable_store_key_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = tmp_path / "store.pub"
    key.write_text(KEY + "\n")
    key.chmod(0o000)

    code, _, err = run_cli(capsys, "client", "models", "list", "--store-key", str(key))

    assert code == 1
    assert_one_error_line(err, r"cannot read --store-key .*store.pub")


def test_client_infer_on_a_truncated_npz(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    whole = tmp_path / "whole.npz"
    np.savez(whole, images=np.zeros((10, 28, 28), np.uint8), labels=np.zeros(10, np.int64))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cache = tmp_path / "cache"

    code, _, err = run_cli(
        capsys, "client", "infer", "cnn", "--input", str(truncated), "--store-key", KEY,
        "--cache-dir", str(cache),
    )  # fmt: skip

    assert code == 1
    assert_one_error_line(err, r"cannot read .*truncated.npz as .npz or .npy")
    assert not cache.exists()


def test_store_export_into_a_path_under_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = publish_store(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    code, _, err = run_cli(
        capsys, "store", "export", "cnn", "latest", str(blocker / "out"),
        "--db-url", env["FEDGE_DB_URL"], "--store-dir", env["FEDGE_STORE_DIR"],
    )  # fmt: skip

    assert code == 1
    assert_one_error_line(err, r"DESTINATION .*a-file/out: .*a-file is not a directory")


@pytest.mark.skipif(AS_ROOT, reason="root writes through chmod 000")
def test_store_export_into_a_read_only_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = publish_store(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)

    code, _, err = run_cli(
        capsys, "store", "export", "cnn", "latest", str(locked / "out"),
        "--db-url", env["FEDGE_DB_URL"], "--store-dir", env["FEDGE_STORE_DIR"],
    )  # fmt: skip

    assert code == 1
    assert_one_error_line(err, r"DESTINATION .*locked/out: cannot write in")
    assert not (locked / "out").exists()


def test_sim_samples_into_a_path_under_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    code, _, err = run_cli(capsys, "sim", "samples", "--out", str(blocker / "held-out.npz"))

    assert code == 1
    assert_one_error_line(err, r"--out .*a-file/held-out.npz: .*a-file is not a directory")


@pytest.mark.skipif(AS_ROOT, reason="root writes through chmod 000")
def test_sim_samples_into_a_read_only_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)

    code, _, err = run_cli(capsys, "sim", "samples", "--out", str(locked / "held-out.npz"))

    assert code == 1
    assert_one_error_line(err, r"--out .*held-out.npz: cannot write in")


def test_audit_list_with_an_absurd_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = _audit_db(tmp_path)

    code, _, err = run_cli(
        capsys, "audit", "list", "--db-url", url, "--last", "99999999999999999999"
    )  # fmt: skip

    assert code == 2
    assert_one_error_line(err, r"--last.*99999999999999999999 is not in the range")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ('{"round":7}', "its content does not match its hash"),
        ('{"round":7', "its payload is not canonical JSON (not valid JSON"),
        # The stored round is 1; a first-wins parser would read 7 under an intact hash.
        ('{"round":7,"round":1}', "its payload is not canonical JSON (duplicate key 'round')"),
        ('{"round": 1}', "its payload is not canonical JSON (JSON not in canonical form"),
    ],
)
def test_audit_list_marks_a_tampered_record(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, payload: str, problem: str
) -> None:
    url = _audit_db(tmp_path)
    with sqlite3.connect(tmp_path / "audit.db") as connection:
        connection.execute("UPDATE audit_events SET payload = ? WHERE seq = 2", (payload,))

    code, out, err = run_cli(capsys, "audit", "list", "--db-url", url)
    _, as_json, _ = run_cli(capsys, "audit", "list", "--db-url", url, "--json")

    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 3
    assert "DAMAGED" not in lines[0] and "DAMAGED" not in lines[2]
    assert f"DAMAGED: {problem}" in lines[1]
    assert_one_error_line(err, r"1 of the records listed are damaged \(first: record 2\)")
    problems = [record["problem"] for record in json.loads(as_json)]
    assert problems[0] is None and problems[2] is None
    assert problems[1].startswith(problem)
