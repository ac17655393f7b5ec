"""TLS contexts (TLS 1.2 or later) for fedge's HTTPS endpoints and their clients."""

from __future__ import annotations

import ssl
from pathlib import Path

from fedge.errors import ConfigError

__all__ = ["pinned_client_context", "tls_context"]


def tls_context(certificate: Path, private_key: Path) -> ssl.SSLContext:
    """Return a server TLS context (TLS 1.2 or later) from PEM files.

    Raises
    ------
    ConfigError
        If the files cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load the TLS certificate or key: {error}") from error
    return context


def pinned_client_context(ca_pem: bytes) -> ssl.SSLContext:
    """Return a client TLS context that trusts only the CA ``ca_pem`` (a deployment's own)."""
    return ssl.create_default_context(cadata=ca_pem.decode("ascii"))
