"""The store's Ed25519 signing key: load or create it safely, sign manifests."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.manifest import SIGNING_CONTEXT, Manifest, SignedManifest, key_id_for
from edge_runtime.release import DIRECTIVE_CONTEXT, ReleaseDirective, SignedDirective
from fedge.errors import ConfigError, FedgeError, StorageError

if TYPE_CHECKING:
    from fl_server.audit import AuditLog

__all__ = ["StoreKey"]

_LOGGER = logging.getLogger(__name__)


class StoreKey:
    """The store's Ed25519 signing key (never printed, logged or pickled)."""

    __slots__ = ("_private_key",)

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> StoreKey:
        """Create a key from 32 bytes of ``random_bytes`` (a CSPRNG unless testing)."""
        return cls(Ed25519PrivateKey.from_private_bytes(random_bytes(32)))

    @classmethod
    def load_or_create(
        cls, path: Path, *, audit: AuditLog | None = None, created_by: str = "fedge store"
    ) -> StoreKey:
        """Load the key at ``path`` (PKCS8 PEM), or create it there with mode 0o600.

        Parameters
        ----------
        path
            The key file.
        audit
            Where to record ``key.created`` (key id and public key only) when
            this call creates the key; ``None`` records nothing.
        created_by
            What created it, for that record.

        Raises
        ------
        ConfigError
            If the file is readable or writable by group or others, or is not an
            unencrypted Ed25519 PKCS8 PEM key.
        StorageError
            If the file cannot be read or written, or the new key cannot be
            recorded (the key is then kept: it exists, and the message names it).
        """
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = cls.generate()
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temporary, path)  # never replaces a key another process just created
            except FileExistsError:
                return cls._load(path)
        except OSError as exc:
            raise StorageError(f"cannot create the store key {path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        _LOGGER.info("created store signing key %s at %s", key.key_id, path)
        if audit is not None:
            key._record_creation(audit, created_by)
        return key

    def _record_creation(self, audit: AuditLog, created_by: str) -> None:
        from fl_server.audit import AuditEventKind
        from fl_server.deployment_audit import NewKey

        record = NewKey(
            purpose="store_signing",
            algorithm="ed25519",
            key_id=self.key_id,
            public_key=self.public_key_bytes().hex(),
        )
        try:
            audit.append(AuditEventKind.KEY_CREATED, {**record.payload(), "created_by": created_by})
        except FedgeError as exc:
            raise StorageError(
                f"created store signing key {self.key_id} but could not audit it: {exc}"
            ) from exc

    @classmethod
    def _load(cls, path: Path) -> StoreKey:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot open the store key {path}: {exc}") from exc
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & 0o077:
                raise ConfigError(
                    f"store key {path} has mode {mode & 0o777:o}; it must not be "
                    "accessible by group or others (chmod 600)"
                )
            pem = handle.read()
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (TypeError, ValueError):
            raise ConfigError(f"store key {path} is not an unencrypted PKCS8 PEM key") from None
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError(f"store key {path} is not an Ed25519 key")
        return cls(private_key)

    def public_key_bytes(self) -> bytes:
        """Return the raw 32-byte public key."""
        return self._private_key.public_key().public_bytes_raw()

    @property
    def key_id(self) -> str:
        """The first 16 hex digits of SHA-256 of the public key."""
        return key_id_for(self.public_key_bytes())

    def sign(self, manifest: Manifest) -> SignedManifest:
        """Sign ``manifest``'s canonical bytes."""
        signature = self._private_key.sign(SIGNING_CONTEXT + manifest.canonical_bytes())
        return SignedManifest(manifest, signature, self.key_id)

    def sign_directive(self, directive: ReleaseDirective) -> SignedDirective:
        """Sign a release directive's canonical bytes (under its own signing context)."""
        signature = self._private_key.sign(DIRECTIVE_CONTEXT + directive.canonical_bytes())
        return SignedDirective(directive, signature, self.key_id)

    def __repr__(self) -> str:
        return f"StoreKey(key_id={self.key_id!r})"

    def __reduce__(self) -> Any:
        raise TypeError("StoreKey is not picklable: it holds a private key")
