"""Server TLS contexts (TLS 1.2 or later) for fedge's HTTPS endpoints, cloud and device alike."""

from __future__ import annotations

import ssl
from pathlib import Path

from fedge.errors import ConfigError

__all__ = ["tls_context"]


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
