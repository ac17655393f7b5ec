"""``fedge server init DIR``: make a deployment directory with its keys, certificates and config.

Everything is made once, here, with the OS CSPRNG (``cryptography`` and
``secrets``): a private CA and the server's TLS certificate, the enrolment
authority's key (read later only by the gateway process), the store's signing
key, the coordinator's secret for the SuperLink, the database (migrated), and
``fedge-server.toml``. Secret files are 0600. An existing deployment is never
overwritten, and a directory that is not empty is refused. Every key made here
is recorded as ``key.created`` (public key, key id or certificate fingerprint;
never a private key or secret). fedge has no rotation command yet: a key is
made once, here, or by the first publish to a store without one.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from edge_runtime.local_data import load_examples
from edge_runtime.manifest import key_id_for
from edge_runtime.secret_files import write_secret
from fedge.errors import ConfigError, StorageError
from fl_server.audit import AuditLog
from fl_server.audit.checkpoints import key_id as checkpoint_key_id
from fl_server.audit.trust import AuditTrust
from fl_server.db import open_database
from fl_server.deployment import (
    DeploymentConfig,
    DeploymentLayout,
    render_config,
)
from fl_server.deployment_audit import NewKey, record_keys
from fl_server.enrolment.authority import write_authority
from fl_server.pki import (
    certificate_to_pem,
    create_ca,
    issue_server_certificate,
    load_certificate_pem,
    private_key_to_pem,
)
from fl_server.store.keys import StoreKey
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import SystemRandomSource

__all__ = ["ca_fingerprint", "init_deployment"]

_CA_DAYS = 3650
_SERVER_DAYS = 825
_LOOPBACK = "127.0.0.1"


def ca_fingerprint(ca_pem: bytes) -> str:
    """Return ``sha256:HEX`` of the CA certificate's PEM (what devices pin at enrolment)."""
    der = load_certificate_pem(ca_pem).public_bytes(Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def init_deployment(
    root: Path,
    *,
    sans: tuple[str, ...] = ("localhost", "127.0.0.1"),
    public_url: str | None = None,
    address: str | None = None,
    database_url: str = "",
    eval_data: Path | None = None,
    config: DeploymentConfig | None = None,
    now: datetime | None = None,
) -> DeploymentLayout:
    """Create the deployment directory ``root`` and return its layout.

    Parameters
    ----------
    root
        The directory; created, or an existing empty one.
    sans
        The names and addresses devices reach the server by (the certificate's SANs).
    public_url
        The URL devices enrol with; default ``https://<first SAN>:<port>``.
    address
        Where the gateway listens (``host:port``); default ``0.0.0.0:9443``.
    database_url
        A PostgreSQL URL; empty: SQLite in the directory.
    eval_data
        The server's held-out set (an ``.npz`` in the local data format), copied in.
    config
        A starting configuration (its ``server`` section is replaced by the above).
    now
        The time the certificates start (tests).

    Raises
    ------
    ConfigError
        If ``root`` is a file or a non-empty directory, or a SAN or URL is malformed.
    DataError
        If ``eval_data`` is not a valid local data file.
    """
    moment = now or datetime.now(UTC)
    layout = DeploymentLayout(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    if layout.config.exists():
        raise ConfigError(f"{root} is already a fedge deployment ({layout.config.name} exists)")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; give a new or empty directory")
    if eval_data is not None:
        load_examples(eval_data)  # refuse a bad file before anything is written
    base = config or DeploymentConfig()
    port = (address or base.server.address).rpartition(":")[2]
    # The supervisor, the gateway and `fedge server revoke` reach the SuperLink (and the
    # gateway) on 127.0.0.1 and verify its certificate, so it always names loopback too.
    cert_sans = tuple(dict.fromkeys([*sans, _LOOPBACK]))
    server = replace(
        base.server,
        sans=cert_sans,
        address=address or base.server.address,
        public_url=public_url or f"https://{_host_for_url(sans[0])}:{port}",
        database_url=database_url,
    )
    chosen = replace(base, server=server)
    ca_key, ca_cert = create_ca("fedge deployment CA", valid_days=_CA_DAYS, now=moment)
    server_key, server_cert = issue_server_certificate(
        ca_key, ca_cert, sans=list(cert_sans), valid_days=_SERVER_DAYS, now=moment
    )
    try:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        layout.tls.mkdir(exist_ok=True)
        layout.state.mkdir(mode=0o700, exist_ok=True)
        layout.logs.mkdir(exist_ok=True)
        layout.runs.mkdir(exist_ok=True)
        layout.ca_cert.write_bytes(certificate_to_pem(ca_cert))
        write_secret(layout.ca_key, private_key_to_pem(ca_key))
        layout.server_cert.write_bytes(certificate_to_pem(server_cert))
        write_secret(layout.server_key, private_key_to_pem(server_key))
        authority = EnrolmentAuthority.generate(SystemRandomSource())
        write_authority(layout.authority_key, authority)
        layout.authority_public_key.write_text(authority.public_key.hex() + "\n", encoding="ascii")
        write_secret(layout.superexec_secret, secrets.token_bytes(32))
        store_key = StoreKey.load_or_create(layout.store / "store-key.pem")
        # Signs the trail's checkpoints; not the database credential (fl_server.audit.trust).
        checkpoint_key = AuditTrust.of_home(layout.root).signer().public_key
        if eval_data is not None:
            shutil.copyfile(eval_data, root / chosen.evaluation.data)
        engine = open_database(layout.database_url(chosen))
        try:
            record_keys(
                AuditLog(engine),
                [
                    _certificate_key("tls_ca", ca_cert),
                    _certificate_key("tls_server", server_cert),
                    NewKey(
                        purpose="enrolment_authority",
                        algorithm="ed25519",
                        key_id=key_id_for(authority.public_key),
                        public_key=authority.public_key.hex(),
                    ),
                    NewKey(
                        purpose="store_signing",
                        algorithm="ed25519",
                        key_id=store_key.key_id,
                        public_key=store_key.public_key_bytes().hex(),
                    ),
                    NewKey(
                        purpose="audit_checkpoint",
                        algorithm="ed25519",
                        key_id=checkpoint_key_id(checkpoint_key),
                        public_key=checkpoint_key.hex(),
                    ),
                    NewKey(purpose="superexec_secret", algorithm="random-256"),
                ],
                created_by="fedge server init",
            )
        finally:
            engine.dispose()
        # Written last: its presence says the directory is complete.
        layout.config.write_text(render_config(chosen), encoding="utf-8")
    except (OSError, StorageError) as exc:
        # The directory was new or empty: leave it so, and `init` can be run again.
        _empty(root)
        raise ConfigError(f"cannot create the deployment in {root}: {exc}") from None
    return layout


def _certificate_key(purpose: str, certificate: x509.Certificate) -> NewKey:
    """Name a certificate's key by the certificate's SHA-256 fingerprint (what devices pin)."""
    key = certificate.public_key()
    # fl_server.pki makes EC keys only; anything else is named by its type.
    algorithm = (
        f"ecdsa-{key.curve.name}"
        if isinstance(key, ec.EllipticCurvePublicKey)
        else type(key).__name__
    )
    return NewKey(
        purpose=purpose,
        algorithm=algorithm,
        key_id=f"{certificate.serial_number:x}",
        fingerprint_sha256=hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest(),
        not_after=certificate.not_valid_after_utc,
    )


def _empty(root: Path) -> None:
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
