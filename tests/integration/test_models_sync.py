"""``fedge client models sync``: an enrolled device fetches from a real store server over TLS.

The device's state is laid out as ``fedge client enroll`` writes it (device.json,
identity key and certificate, the pinned CA); the command runs in this process
through ``fedge.cli.main`` while the store serves from a thread.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edge_runtime.cache import InstallOutcome, ModelCache, ModelRejected
from edge_runtime.manifest import ArtefactFormat, Precision
from edge_runtime.secret_files import write_secret
from fedge.cli import main
from fedge.errors import ConfigError
from fl_client.device_home import DeviceHome, DeviceRecord
from fl_client.model_sync import SyncConfig, sync_model
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.serve import StoreServer, tls_context
from fl_server.store.store import ModelStore, NewArtefact
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom
from tests.helpers import self_signed_certificate

INT8, FP32, REFERENCE = "model-int8-static.onnx", "model-fp32.onnx", "drift-reference.json"


def blob(label: str, size: int = 96 << 10) -> bytes:
    seed = hashlib.sha256(label.encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def enrolled_device(directory: Path, authority: EnrolmentAuthority, ca: Path) -> None:
    """Write what ``fedge client enroll`` leaves in the device's directory."""
    identity = authority.enrol("device-7", DeterministicRandom(7))
    home = DeviceHome(directory)
    directory.mkdir(mode=0o700)
    home.ca_cert.write_bytes(ca.read_bytes())
    write_secret(home.identity_key, identity.signing_seed)
    home.identity_certificate.write_text(json.dumps(identity.certificate.to_json()))
    record = DeviceRecord(device_id="device-7", node_id=7, server_url="https://gateway:9092")
    home.record.write_text(json.dumps(record.to_json()))


class Deployment:
    """A store served over TLS and one enrolled device with an empty model cache."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        authority = EnrolmentAuthority.generate(DeterministicRandom(1))
        self.engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
        self.key = StoreKey.generate()
        self.store = ModelStore(self.engine, FileBlobStore(tmp_path / "store"), self.key)
        cert, key = self_signed_certificate(tmp_path / "tls")
        self.server = StoreServer(
            self.store, authority_public_key=authority.public_key, tls=tls_context(cert, key)
        )
        self.device_dir, self.cache_dir = tmp_path / "device", tmp_path / "cache"
        enrolled_device(self.device_dir, authority, cert)
        self.serving = False

    def start(self) -> None:
        self.server.start()
        self.serving = True

    def stop(self) -> None:
        if self.serving:
            self.serving = False
            self.server.stop()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server.port}"

    def publish(self, label: str, *, rejected: frozenset[str] = frozenset()) -> None:
        self.store.publish(
            "cnn",
            [
                NewArtefact(
                    name=name,
                    data=blob(f"{label}-{name}"),
                    format=ArtefactFormat.JSON if name == REFERENCE else ArtefactFormat.ONNX,
                    precision=Precision.INT8 if name == INT8 else Precision.FP32,
                    rejected=name in rejected,
                )
                for name in (INT8, FP32, REFERENCE)
            ],
        )

    def args(self, *extra: str) -> list[str]:
        return [
            "--store-url",
            self.url,
            "--store-key",
            self.key.public_key_bytes().hex(),
            "--device-dir",
            str(self.device_dir),
            "--cache-dir",
            str(self.cache_dir),
            *extra,
        ]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    created = Deployment(tmp_path)
    created.start()
    try:
        yield created
    finally:
        created.stop()
        created.engine.dispose()


def fedge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def one_error(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedge: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_sync_installs_upgrades_and_rolls_back_without_the_network(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment.publish("1", rejected=frozenset({INT8}))
    sync = ("client", "models", "sync", "cnn")

    code, out, err = fedge(capsys, *sync, *deployment.args())

    assert code == 0, err
    assert out[0] == (
        f"cnn@latest from {deployment.url} as device-7: downloaded 196,608 bytes; chosen among "
        "the signed offer: model-fp32.onnx, drift-reference.json"
    )
    assert out[1].startswith("installed cnn v1 model-fp32.onnx (+ drift-reference.json): ")
    assert out[2] == "rollback: no previous version is cached"
    cache = ModelCache(deployment.cache_dir, trusted_key=deployment.key.public_key_bytes())
    current = cache.current("cnn")
    assert current is not None and current.path.read_bytes() == blob(f"1-{FP32}")
    assert cache.companion(current, REFERENCE) is not None

    code, out, _ = fedge(capsys, *sync, *deployment.args())
    assert code == 0
    assert "nothing downloaded" in out[0]
    assert out[1].startswith("cnn v1 model-fp32.onnx (+ drift-reference.json) is already current")

    deployment.publish("2")
    code, out, _ = fedge(capsys, *sync, *deployment.args("--json"))
    report = json.loads("\n".join(out))
    assert code == 0 and report["outcome"] == "installed"
    assert report["current"]["version"] == 2 and report["current"]["artefact"] == INT8
    assert report["rollback"]["version"] == 1 and report["offer_signed"] is True
    assert report["device_id"] == "device-7"

    code, out, err = fedge(capsys, *sync, *deployment.args("--ref", "1"))
    assert code == 1
    one_error(err, "cnn version 1 is older than the current version 2")

    deployment.stop()  # rollback needs no network: the previous version is cached
    key = deployment.key.public_key_bytes().hex()
    code, out, _ = fedge(
        capsys, "client", "models", "rollback", "cnn", "--store-key", key, "--cache-dir",
        str(deployment.cache_dir),
    )  # fmt: skip
    assert (code, out) == (0, ["cnn -> v1 model-fp32.onnx"])


def test_sync_of_a_named_version_and_preference(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment.publish("1")
    deployment.publish("2")
    deployment.store.tag("cnn", "production", 1)

    code, out, err = fedge(
        capsys,
        "client",
        "models",
        "sync",
        "cnn",
        *deployment.args("--ref", "production", "--prefer", f"{FP32},{INT8}"),
    )

    assert code == 0, err
    assert out[1].startswith("installed cnn v1 model-fp32.onnx")


def test_refusals_are_one_line_and_change_nothing(
    deployment: Deployment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    deployment.publish("1")
    sync = ("client", "models", "sync", "cnn")
    other_key = StoreKey.generate().public_key_bytes().hex()

    code, _, err = fedge(capsys, *sync, *deployment.args("--store-key", other_key))
    assert code == 1
    one_error(err, r"manifest of cnn@latest is refused: .*signed by key")

    code, _, err = fedge(capsys, *sync, *deployment.args("--prefer", "model-fp16.onnx"))
    assert code == 1
    one_error(err, r"cnn v1 offers none of \['model-fp16.onnx'\]")

    code, _, err = fedge(capsys, *sync, *deployment.args("--device-dir", str(tmp_path / "none")))
    assert code == 1
    one_error(err, "this device is not enrolled")

    stranger = tmp_path / "stranger"
    other_authority = EnrolmentAuthority.generate(DeterministicRandom(9))
    enrolled_device(stranger, other_authority, deployment.device_dir / "ca.pem")
    code, _, err = fedge(capsys, *sync, *deployment.args("--device-dir", str(stranger)))
    assert code == 1
    one_error(err, r"refused this device's request .* \(401\)")

    code, _, err = fedge(capsys, *sync, "--store-key", other_key)
    assert code == 1
    one_error(err, "give the model store's URL with --store-url or \\$FEDGE_STORE_URL")

    assert not (deployment.cache_dir / "versions" / "cnn").exists()


def test_sync_model_is_the_library_call_behind_the_command(deployment: Deployment) -> None:
    deployment.publish("1")
    config = SyncConfig(
        model="cnn",
        store_url=deployment.url,
        store_key=deployment.key.public_key_bytes(),
        device_dir=deployment.device_dir,
        cache_dir=deployment.cache_dir,
        ref="1",
        prefer=(FP32,),
    )

    result = sync_model(config, sleep=lambda seconds: None)

    assert result.device_id == "device-7"
    assert result.install.outcome is InstallOutcome.INSTALLED
    assert (result.install.current.version, result.install.current.artefact) == (1, FP32)
    assert result.report.downloaded_bytes == 2 * (96 << 10)
    deployment.publish("2")
    with pytest.raises(ModelRejected, match="offers none of"):
        sync_model(
            replace(config, ref="2", prefer=("model-fp16.onnx",)),
            sleep=lambda seconds: None,
        )
    with pytest.raises(ConfigError, match=r"the CA file .*missing\.pem does not exist"):
        sync_model(replace(config, ca_file=deployment.tmp_path / "missing.pem"))
