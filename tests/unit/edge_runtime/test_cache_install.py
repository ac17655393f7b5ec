"""Installs as transactions: every byte verified, reports of what was done, nothing partial.

A failure at any step (a digest that does not match, a full disk, a KeyboardInterrupt,
before or after the rename, before or after the pointer swap) leaves the cache byte for
byte as it was; the version switched away from stays cached (blue-green).
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edge_runtime.cache as cache_module
from edge_runtime.cache import InstallOutcome, ModelCache, ModelCorrupt, ModelRejected
from edge_runtime.manifest import (
    SIGNING_CONTEXT,
    ArtefactEntry,
    ArtefactFormat,
    Manifest,
    Precision,
    SignedManifest,
    key_id_for,
)
from fedge.errors import ConfigError

STORE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
TRUSTED = STORE_KEY.public_key().public_bytes_raw()
INT8, FP32, REFERENCE = "model-int8-static.onnx", "model-fp32.onnx", "drift-reference.json"
NAMES = (INT8, FP32, REFERENCE)


def payload(version: int, name: str, size: int = 3 << 20) -> bytes:
    seed = hashlib.sha256(f"{version}/{name}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def sign(version: int, *, metadata: dict[str, Any] | None = None) -> SignedManifest:
    manifest = Manifest(
        model="cnn",
        version=version,
        parent=None,
        artefacts=tuple(
            ArtefactEntry(
                name=name,
                digest=hashlib.sha256(payload(version, name)).hexdigest(),
                size=len(payload(version, name)),
                format=ArtefactFormat.JSON if name == REFERENCE else ArtefactFormat.ONNX,
                precision=Precision.INT8 if name == INT8 else Precision.FP32,
            )
            for name in NAMES
        ),
        metadata={"round": version} if metadata is None else metadata,
        created_at="2026-01-31T12:00:00Z",
    )
    signature = STORE_KEY.sign(SIGNING_CONTEXT + manifest.canonical_bytes())
    return SignedManifest(manifest, signature, key_id_for(TRUSTED))


class Device:
    """A cache, the files a bundle would hold, and a switchable fault at one swap step."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "cache"
        self.bundle = tmp_path / "bundle"
        self.bundle.mkdir()
        self.fault: tuple[str, BaseException] | None = None
        self.steps: list[str] = []
        self.cache = ModelCache(self.root, trusted_key=TRUSTED, keep=1, _step_hook=self._hook)

    def _hook(self, step: str) -> None:
        self.steps.append(step)
        if self.fault is not None and self.fault[0] == step:
            raise self.fault[1]

    def file(self, version: int, name: str, data: bytes | None = None) -> Path:
        path = self.bundle / f"{version}-{name}"
        path.write_bytes(payload(version, name) if data is None else data)
        return path

    def install(self, version: int, name: str = FP32, **kwargs: Any) -> Any:
        return self.cache.install(sign(version), name, self.file(version, name), **kwargs)

    def snapshot(self) -> dict[str, bytes | None]:
        return {
            str(path.relative_to(self.root)): None if path.is_dir() else path.read_bytes()
            for path in sorted(self.root.rglob("*"))
            if path.name != "lock"
        }


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_a_tampered_source_is_refused_even_for_the_installed_version(device: Device) -> None:
    device.install(1)
    before = device.snapshot()
    tampered = device.file(1, FP32, b"X" + payload(1, FP32)[1:])

    with pytest.raises(ModelRejected, match=r"model-fp32\.onnx hashes to"):
        device.cache.install(sign(1), FP32, tampered)
    with pytest.raises(ModelRejected, match="has 5 bytes, the signed manifest says"):
        device.cache.install(sign(1), FP32, device.file(1, FP32, b"short"))
    assert device.snapshot() == before

    again = device.install(1)
    assert again.outcome is InstallOutcome.ALREADY_CURRENT
    assert (again.verified_bytes, again.written_bytes) == (3 << 20, 0)


def test_outcomes_bytes_and_the_version_kept_for_rollback(device: Device) -> None:
    first = device.install(1, companions={REFERENCE: device.file(1, REFERENCE)})
    assert first.outcome is InstallOutcome.INSTALLED
    assert (first.replaced, first.rollback, first.companions) == (None, None, (REFERENCE,))
    assert first.verified_bytes == first.written_bytes == 6 << 20

    second = device.install(2)
    assert second.outcome is InstallOutcome.INSTALLED
    assert second.replaced is not None and second.replaced.version == 1
    assert second.rollback is not None and second.rollback.version == 1
    assert device.cache.versions("cnn") == [1, 2]  # keep=1, yet v1 stays: blue-green

    back = device.cache.activate(sign(1), FP32, companions=(REFERENCE,), allow_downgrade=True)
    assert back.outcome is InstallOutcome.REACTIVATED
    assert (back.written_bytes, back.verified_bytes) == (0, 6 << 20)
    assert back.rollback is not None and back.rollback.version == 2
    assert device.cache.versions("cnn") == [1, 2]

    variant = device.install(1, INT8, allow_downgrade=True)  # another variant of v1
    assert variant.outcome is InstallOutcome.INSTALLED
    assert variant.replaced is not None and variant.replaced.artefact == FP32
    assert variant.rollback is not None and (
        variant.rollback.version,
        variant.rollback.artefact,
    ) == (
        1,
        FP32,
    )
    assert variant.summary()[1] == "rollback: v1 model-fp32.onnx stays cached"


def test_rollback_after_an_upgrade_is_a_pointer_swap(device: Device) -> None:
    device.install(1)
    device.install(2)
    for path in device.bundle.iterdir():
        path.unlink()
    versions = {k: v for k, v in device.snapshot().items() if k.startswith("versions")}
    device.steps.clear()

    rolled = device.cache.rollback("cnn")

    assert rolled.version == 1 and rolled.path.read_bytes() == payload(1, FP32)
    assert "copying" not in device.steps
    assert {k: v for k, v in device.snapshot().items() if k.startswith("versions")} == versions


def test_activating_what_is_absent_or_rotten_is_refused(device: Device) -> None:
    with pytest.raises(ModelRejected, match=r"cnn v1 model-fp32\.onnx is absent"):
        device.cache.activate(sign(1), FP32)
    device.install(1)
    device.install(2)
    path = device.root / "versions" / "cnn" / "1" / FP32
    path.chmod(0o644)
    path.write_bytes(b"rot")
    before = device.snapshot()

    with pytest.raises(ModelCorrupt, match=r"cnn v1 model-fp32\.onnx is corrupt on disk"):
        device.cache.activate(sign(1), FP32, allow_downgrade=True)
    assert device.snapshot() == before
    assert device.cache.missing(sign(1), [FP32, INT8]) == [FP32, INT8]
    assert device.cache.missing(sign(2), [FP32, INT8]) == [INT8]

    repaired = device.install(1, allow_downgrade=True)  # a verified source replaces the rot
    assert repaired.outcome is InstallOutcome.INSTALLED and repaired.written_bytes == 3 << 20
    assert path.read_bytes() == payload(1, FP32)


def test_a_json_document_is_not_a_model_and_a_model_is_not_its_own_companion(
    device: Device,
) -> None:
    with pytest.raises(ModelRejected, match=r"drift-reference\.json is a json document"):
        device.install(1, REFERENCE)
    with pytest.raises(ConfigError, match="cannot be its own companion"):
        device.install(1, companions={FP32: None})
    with pytest.raises(ModelRejected, match=r"'absent\.onnx' is not in the manifest"):
        device.install(1, companions={"absent.onnx": None})
    assert device.snapshot() == {
        "current": None,
        "downloads": None,
        "staging": None,
        "versions": None,
    }


def _no_space(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# (the step the fault is raised at, the exception)
FAULTS: dict[str, tuple[str, BaseException]] = {
    "interrupted-mid-copy": ("copying", KeyboardInterrupt()),
    "interrupted-after-staging": ("staged", KeyboardInterrupt()),
    "interrupted-after-rename": ("renamed", KeyboardInterrupt()),
    "disk-error-at-pointer-temp": ("pointer-temp", OSError(errno.EIO, "I/O error")),
    "interrupted-after-pointer-swap": ("pointer-written", KeyboardInterrupt()),
}
# What is installed before the failed install, and what the failed install is.
SCENARIOS: dict[str, tuple[Callable[[Device], object], Callable[[Device], object]]] = {
    "first-install": (
        lambda d: None,
        lambda d: d.install(1, companions={REFERENCE: d.file(1, REFERENCE)}),
    ),
    "upgrade": (lambda d: d.install(1), lambda d: d.install(2)),
    "variant-into-a-version": (lambda d: d.install(1), lambda d: d.install(1, INT8)),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_a_failure_at_any_step_leaves_the_cache_as_it_was(
    device: Device, fault: str, scenario: str
) -> None:
    arrange, act = SCENARIOS[scenario]
    arrange(device)
    before = device.snapshot()
    device.fault = FAULTS[fault]

    with pytest.raises((KeyboardInterrupt, OSError)):
        act(device)

    assert device.snapshot() == before
    device.fault = None
    act(device)  # and the same install then succeeds
    assert device.cache.current("cnn") is not None


def test_a_disk_error_mid_copy_leaves_the_cache_as_it_was(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    device.install(1)
    before = device.snapshot()
    monkeypatch.setattr(cache_module, "write_all", _no_space)

    with pytest.raises(OSError, match="No space left on device"):
        device.install(2)

    assert device.snapshot() == before


def test_a_bad_model_takes_its_good_companion_down_with_it(device: Device) -> None:
    device.install(1)
    before = device.snapshot()
    bad = device.file(2, FP32, payload(2, FP32)[:-1])

    with pytest.raises(ModelRejected, match="has 3145727 bytes"):
        device.cache.install(sign(2), FP32, bad, companions={REFERENCE: device.file(2, REFERENCE)})

    assert device.snapshot() == before


def test_a_conflicting_version_directory_is_restored_if_the_install_fails(
    device: Device,
) -> None:
    device.install(1)
    before = device.snapshot()
    other = sign(1, metadata={"round": 1, "rebuilt": True})  # same version, other manifest
    device.fault = ("renamed", OSError(errno.EIO, "I/O error"))

    with pytest.raises(OSError, match="I/O error"):
        device.cache.install(other, FP32, device.file(1, FP32))
    assert device.snapshot() == before

    device.fault = None
    replaced = device.cache.install(other, FP32, device.file(1, FP32))
    assert replaced.outcome is InstallOutcome.INSTALLED
    assert replaced.current.manifest.metadata["rebuilt"] is True
    assert device.cache.current("cnn").manifest.metadata["rebuilt"] is True  # type: ignore[union-attr]
    assert list((device.root / "staging").iterdir()) == []


def test_opening_removes_version_directories_that_hold_no_model(device: Device) -> None:
    device.install(1)
    device.install(2)
    # What an older fedge left after a failed install: the companion alone.
    leftover = device.root / "versions" / "cnn" / "3"
    leftover.mkdir()
    (leftover / "manifest.json").write_text(json.dumps(sign(3).to_json()))
    (leftover / REFERENCE).write_bytes(payload(3, REFERENCE))
    unreadable = device.root / "versions" / "cnn" / "4"
    unreadable.mkdir()
    (device.root / "staging" / "install-crashed").mkdir()
    assert device.cache.versions("cnn") == [1, 2, 3]

    reopened = ModelCache(device.root, trusted_key=TRUSTED)

    assert reopened.versions("cnn") == [1, 2]
    assert not leftover.exists() and not unreadable.exists()
    assert list((device.root / "staging").iterdir()) == []
    assert reopened.current("cnn").version == 2  # type: ignore[union-attr]
    assert reopened.rollback("cnn").version == 1
