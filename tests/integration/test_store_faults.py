"""Model store under faults: SIGKILL during a publish, eight concurrent publishers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fl_server.audit import AuditLog
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact

_PRELUDE = """
import sys, time
from pathlib import Path
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact
from fl_server.audit import AuditLog
url, root = sys.argv[1], Path(sys.argv[2])
engine = open_database(url)
store = ModelStore(
    engine, FileBlobStore(root), StoreKey.load_or_create(root / "key.pem"), audit=AuditLog(engine)
)
"""


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_PRELUDE) + textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _store(url: str, root: Path) -> ModelStore:
    return ModelStore(
        open_database(url), FileBlobStore(root), StoreKey.load_or_create(root / "key.pem")
    )


def test_a_publish_killed_mid_transaction_leaves_no_version(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    _store(db_url, root)  # creates the key and the schema first
    marker = tmp_path / "in-transaction"
    # Pause inside the transaction (the number is chosen, the rows not committed).
    child = _python(
        f"""
        original = StoreKey.sign
        def slow_sign(self, manifest):
            Path({str(marker)!r}).write_text("x")
            time.sleep(120)
            return original(self, manifest)
        StoreKey.sign = slow_sign
        store.publish("cnn", [NewArtefact(name="weights.npz", data=b"half" * 1000)])
        """,
        db_url,
        str(root),
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)

    store = _store(db_url, root)
    assert store.versions() == []
    audit_engine = open_database(db_url)
    assert list(AuditLog(audit_engine).iter()) == []
    audit_engine.dispose()
    assert store.publish("cnn", [NewArtefact(name="w.npz", data=b"ok")]).manifest.version == 1
    # The killed publish's object is unreferenced: GC removes it, keeps the good one.
    assert store.gc(keep_last=5, min_age_s=0) == {
        "versions_deleted": 0,
        "objects_deleted": 1,
        "temporaries_deleted": 0,
    }
    assert store.verify("cnn", 1).ok


@pytest.mark.slow
def test_eight_concurrent_publishers_never_duplicate_or_lose_a_version(
    db_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    _store(db_url, root)
    children = [
        _python(
            """
            worker = sys.argv[3]
            for i in range(5):
                v = store.publish("cnn", [NewArtefact(name="w.npz", data=f"{worker}-{i}".encode())])
                print(v.manifest.version, flush=True)
            """,
            db_url,
            str(root),
            str(worker),
        )
        for worker in range(8)
    ]
    reported: list[int] = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        reported += [int(line) for line in out.split()]

    store = _store(db_url, root)
    stored = [v.manifest.version for v in store.versions("cnn")]
    assert sorted(reported) == stored == list(range(1, 41))
    # Each publish committed exactly one audit event with it, and the chain holds.
    audit_engine = open_database(db_url)
    audit = AuditLog(audit_engine)
    published = [e.payload["version"] for e in audit.iter() if e.kind.value == "store.published"]
    assert sorted(int(str(v)) for v in published) == list(range(1, 41))
    assert audit.verify().ok
    audit_engine.dispose()
    assert all(store.verify("cnn", v).ok for v in (1, 20, 40))
