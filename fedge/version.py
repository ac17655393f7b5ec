"""The installed fedge version and the code version recorded in audit events."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["PROVENANCE_PACKAGES", "__version__", "code_version", "package_versions"]

# The packages whose versions decide what a run computed: recorded with every run.
PROVENANCE_PACKAGES = (
    "flwr",
    "torch",
    "opacus",
    "numpy",
    "scipy",
    "cryptography",
    "onnx",
    "onnxruntime",
    "sqlalchemy",
)

try:
    __version__: str = metadata.version("fedge")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
    __version__ = "0.0.0+unknown"


@functools.cache
def code_version() -> str:
    """Return the package version plus the git commit of the source tree, if any.

    Returns
    -------
    str
        ``"0.1.0+g1a2b3c4"`` in a git checkout (``.dirty`` appended when the tree
        has uncommitted changes), otherwise the bare package version.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not commit:
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"


@functools.cache
def package_versions() -> dict[str, str]:
    """Return the installed version of each of :data:`PROVENANCE_PACKAGES` ("absent" if missing)."""
    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
