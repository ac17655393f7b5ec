"""A small fedge database populated through the real APIs: a secure central-DP run of 3 rounds."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Engine

from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.events import record_hash
from fl_server.db import open_database
from fl_server.enrolment import DeviceRegistry, create_tokens
from fl_server.ledger import RUN_SUBJECT, PrivacyLedger
from fl_server.pki import public_key_to_pem
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact, VersionInfo
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import GaussianSteps, PrivacySpend

RUN = "run-report-1"
ROUNDS = 3
SAMPLED = (4, 4, 3)
SURVIVORS = (4, 3, 3)


@dataclass(frozen=True)
class Populated:
    engine: Engine
    url: str
    path: Path
    devices: tuple[str, ...]


def sim_config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "dp": "central",
        "epsilon": 50.0,
        "delta": 1e-5,
        "dp_clip": 1.0,
        "noise_multiplier": 1.0,
        "num_clients": 4,
        "num_rounds": ROUNDS,
        "fraction_train": 1.0,
        "poisson_sampling": False,
        "secure_agg": True,
        "threat_model": "active",
        "ring_bits": 32,
        "client_lifetime_epsilon": 100.0,
    }
    return config | changes


def _enrol(engine: Engine, audit: AuditLog, count: int) -> tuple[str, ...]:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    registry = DeviceRegistry(engine, audit)
    authority = EnrolmentAuthority.generate(DeterministicRandom(5))
    tokens = create_tokens(engine, count, expires_at=now + timedelta(days=1), now=now, audit=audit)
    devices = []
    for index, token in enumerate(tokens):
        identity = (
            ed25519.Ed25519PrivateKey.from_private_bytes(bytes([index + 1]) * 32)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        devices.append(
            registry.enrol(
                token,
                supernode_public_key_pem=public_key_to_pem(
                    ec.generate_private_key(ec.SECP256R1()).public_key()
                ),
                identity_public_key=identity,
                authority=authority,
                now=now,
            ).device_id
        )
    return tuple(devices)


def append_raw(engine_path: Path, kind: str, payload_json: str, run_id: str | None) -> int:
    """Append a correctly chained record of any kind (one this fedge may not know)."""
    with sqlite3.connect(engine_path) as connection:
        seq, head = connection.execute("SELECT seq, record_hash FROM audit_head").fetchone()
        recorded_at = datetime.now(UTC).isoformat(timespec="microseconds")
        digest = record_hash(
            seq=seq + 1,
            recorded_at=recorded_at,
            kind=kind,
            run_id=run_id,
            payload_json=payload_json,
            prev_hash=head,
        )
        connection.execute(
            "INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq + 1, recorded_at, kind, run_id, payload_json, head, digest),
        )
        connection.execute("UPDATE audit_head SET seq = ?, record_hash = ?", (seq + 1, digest))
    return int(seq + 1)


def populate(path: Path, config: dict[str, Any], *, blobs: Path) -> Populated:
    url = f"sqlite:///{path}"
    engine = open_database(url)
    audit = AuditLog(engine)
    devices = _enrol(engine, audit, 4)
    audit.append(
        AuditEventKind.RUN_STARTED,
        {
            "config": config,
            "config_sha256": "0" * 64,
            "code_version": "0.1.0+test",
            "data": {"train_examples": 200},
            "packages": {"flwr": "1.42.0", "torch": "2.13.0"},
        },
        run_id=RUN,
    )
    ledger = PrivacyLedger(engine)
    store = ModelStore(engine, FileBlobStore(blobs), StoreKey.generate(), audit=audit)
    parent = None
    for server_round in range(1, ROUNDS + 1):
        survivors = devices[: SURVIVORS[server_round - 1]]
        spend = PrivacySpend(
            mechanism="central-gaussian",
            gaussian=GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1),
        )
        spends = {RUN_SUBJECT: spend, **dict.fromkeys(survivors, spend)}

        def payload(totals: dict[str, float], r: int = server_round) -> dict[str, Any]:
            return {
                "round": r,
                "mechanism": "central-gaussian",
                "delta": 1e-5,
                "budget": 50.0,
                "epsilon": totals[RUN_SUBJECT],
                "l2_clip": 1.0,
                "noise_multiplier": 1.0,
                "sample_rate": 1.0,
                "participants": len(totals) - 1,
            }

        ledger.record_round(RUN, server_round, spends, delta=1e-5, audit=audit, payload=payload)
        sampled, alive = SAMPLED[server_round - 1], SURVIVORS[server_round - 1]
        audit.append(
            AuditEventKind.ROUND_COMPLETED,
            {
                "round": server_round,
                "accuracy": 0.5 + 0.1 * server_round,
                "loss": 1.0,
                "replies": alive,
                "failures": sampled - alive,
                "model_sha256": "a" * 64,
                "seconds": 1.5,
                "secure_aggregation": {
                    "sampled": sampled,
                    "survivors": alive,
                    "degree": 3,
                    "threshold": 2,
                    "ring_bits": 32,
                    "quant_bits": 29,
                    "aborted": None,
                    "upload_bytes_per_client": 1000,
                },
            },
            run_id=RUN,
        )
        version = store.publish(
            "cnn",
            [NewArtefact(name="weights.npz", data=f"weights-{server_round}".encode())],
            parent=parent,
            info=VersionInfo(
                run_id=RUN,
                server_round=server_round,
                participants=alive,
                # As the coordinator's publisher: the run's epsilon so far, which verification
                # cross-checks against the trail.
                dp_epsilon=ledger.run_epsilon(RUN, delta=1e-5),
                dp_delta=1e-5,
            ),
        )
        parent = version.manifest.version
    audit.append(AuditEventKind.RUN_COMPLETED, {"final_accuracy": 0.8, "rounds": 3}, run_id=RUN)
    return Populated(engine=engine, url=url, path=path, devices=devices)


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Populated]:
    """Read-only: tests that damage a database populate their own."""
    tmp_path = tmp_path_factory.mktemp("populated")
    made = populate(tmp_path / "fedge.db", sim_config(), blobs=tmp_path / "blobs")
    try:
        yield made
    finally:
        made.engine.dispose()
