"""Fetch a model version from ``fedge store serve`` with the device's enrolled identity.

:func:`sync_model` is what ``fedge client models sync`` runs, and what a rollout
agent calls with the version a device should serve: it opens the device's
enrolment state (:class:`~fl_client.device_home.DeviceHome`: identity key,
certificate, pinned CA), signs every request with that identity over TLS, and
installs the chosen artefact in the verified model cache
(:meth:`edge_runtime.fetch.StoreClient.sync`).

Notes
-----
The store is not trusted: the manifest must verify with the store key the device
was provisioned with (``store_key``), the artefact is chosen among those the
*signed* manifest offers, every byte is checked against the signed digests, and a
failure leaves the model that was current in place. A version older than the
current one is refused unless ``allow_downgrade`` is set.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.cache import InstallReport, ModelCache
from edge_runtime.fetch import DEFAULT_PREFER, StoreClient, SyncReport
from fedge.errors import ConfigError
from fl_client.device_home import DeviceHome

__all__ = ["SyncConfig", "SyncResult", "sync_model"]

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_REF = re.compile(r"[A-Za-z0-9_\-]{1,64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncConfig:
    """What to fetch, from which store, into which cache, as which device.

    Parameters
    ----------
    model
        The model's name.
    store_url
        ``https://host[:port]`` of ``fedge store serve`` (it may differ from the
        deployment's gateway).
    store_key
        The store's raw 32-byte Ed25519 public key (``fedge store key``).
    device_dir
        The device's enrolment state (``fedge client enroll --dir``).
    cache_dir
        The device's model cache.
    ref
        A version number, an alias (``production``) or ``latest`` (the default:
        the newest version published).
    ca_file
        The CA the store's TLS certificate must chain to; ``None``: the CA pinned
        at enrolment (``device_dir/ca.pem``).
    prefer
        Artefact names in order of preference (the first one offered is used).
    allow_downgrade
        Accept a version older than the current one.
    timeout_s, retries
        Per-connection socket timeout, and retries of connection errors and 5xx.

    Raises
    ------
    ConfigError
        If a field is malformed.
    """

    model: str
    store_url: str
    store_key: bytes
    device_dir: Path
    cache_dir: Path
    ref: str = "latest"
    ca_file: Path | None = None
    prefer: tuple[str, ...] = DEFAULT_PREFER
    allow_downgrade: bool = False
    timeout_s: float = 30.0
    retries: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or _NAME.fullmatch(self.model) is None:
            raise ConfigError(f"model must match [A-Za-z0-9_.-]{{1,64}}, got {self.model!r:.40}")
        if not isinstance(self.store_url, str) or not self.store_url.startswith("https://"):
            raise ConfigError(
                "the store URL must start with https:// (models are never fetched in the "
                f"clear), got {self.store_url!r:.80}"
            )
        if not isinstance(self.store_key, bytes) or len(self.store_key) != 32:
            raise ConfigError("store_key must be the store's raw 32-byte Ed25519 public key")
        if not isinstance(self.ref, str) or _REF.fullmatch(self.ref) is None:
            raise ConfigError(f"ref must be a number, an alias or 'latest', got {self.ref!r:.40}")
        for what, path in (("device_dir", self.device_dir), ("cache_dir", self.cache_dir)):
            if not isinstance(path, Path):
                raise ConfigError(f"{what} must be a Path, got {path!r:.40}")
        if self.ca_file is not None and not isinstance(self.ca_file, Path):
            raise ConfigError(f"ca_file must be a Path or None, got {self.ca_file!r:.40}")
        if (
            not isinstance(self.prefer, tuple)
            or not self.prefer
            or not all(isinstance(n, str) and _NAME.fullmatch(n) for n in self.prefer)
        ):
            raise ConfigError(
                f"prefer must be a non-empty tuple of artefact names, got {self.prefer!r:.80}"
            )
        if not isinstance(self.allow_downgrade, bool):
            raise ConfigError("allow_downgrade must be a bool")
        timeout = self.timeout_s
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"timeout_s must be a finite number > 0, got {timeout!r:.40}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be an int >= 0, got {self.retries!r:.40}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncResult:
    """What :func:`sync_model` did, and as which device."""

    device_id: str
    store_url: str
    report: SyncReport

    @property
    def install(self) -> InstallReport:
        """What the model cache did (outcome, current model, version kept for rollback)."""
        return self.report.install

    def summary(self) -> list[str]:
        """Return human-readable lines: the fetch, what was installed, what stays for rollback."""
        report = self.report
        fetched = (
            f"downloaded {report.downloaded_bytes:,} bytes"
            if report.downloaded_bytes
            else "nothing downloaded"
        )
        origin = "signed offer" if report.offer_signed else "store's unsigned list (old manifest)"
        first = (
            f"{report.install.current.model}@{report.ref} from {self.store_url} as "
            f"{self.device_id}: {fetched}; chosen among the {origin}: {', '.join(report.offered)}"
        )
        return [first, *report.install.summary()]

    def to_json(self) -> dict[str, Any]:
        """Return the result as JSON values."""
        return {"device_id": self.device_id, "store_url": self.store_url, **self.report.to_json()}


def sync_model(
    config: SyncConfig,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncResult:
    """Fetch ``config.model@config.ref`` from the store and make it current in the cache.

    Parameters
    ----------
    config
        What to fetch and where from.
    clock, sleep
        The time source for request timestamps and the wait between retries.

    Returns
    -------
    SyncResult
        The device id, and what was downloaded and installed (or re-activated, or
        found already current), with the version kept for rollback.

    Raises
    ------
    ConfigError
        If the device is not enrolled, its state is damaged, or the CA file cannot
        be loaded.
    edge_runtime.cache.ModelRejected
        If the manifest or the bytes do not verify, nothing preferred is offered
        or the version is an unallowed downgrade; nothing changes.
    edge_runtime.fetch.FetchError
        If the store cannot be reached or refuses the device (401, 404).
    fedge.errors.StorageError
        If the cache cannot be written.
    """
    home = DeviceHome(config.device_dir)
    record = home.require_enrolled()
    identity = home.identity()
    ca_file = config.ca_file or home.ca_cert
    if not ca_file.is_file():
        raise ConfigError(f"the CA file {ca_file} does not exist (give the store's CA with --ca)")
    client = StoreClient(
        config.store_url,
        identity=identity,
        ca_file=ca_file,
        timeout_s=config.timeout_s,
        retries=config.retries,
        clock=clock,
        sleep=sleep,
    )
    cache = ModelCache(config.cache_dir, trusted_key=config.store_key)
    report = client.sync(
        cache,
        config.model,
        ref=config.ref,
        prefer=config.prefer,
        allow_downgrade=config.allow_downgrade,
    )
    return SyncResult(device_id=record.device_id, store_url=config.store_url, report=report)
