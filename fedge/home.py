"""The fedge home: the one directory that holds a deployment's state.

Which directory: ``--home DIR`` (on the root command, ``fedge --home DIR ...``, or
on a command, ``fedge store list --home DIR``), else ``$FEDGE_HOME``, else
``~/.fedge``. Every default state path of the ``fedge`` command lives under it;
an explicit path option (``--db-url``, ``--store-dir``, ``--runs-dir``,
``--devices-dir``, ``--cache-dir``) or its environment variable still wins.

Layout::

    $FEDGE_HOME/
        fedge.db              the cloud database (SQLite): audit log, privacy ledger,
                              model-store index  [--db-url, $FEDGE_DB_URL]
        store/                the model store    [--store-dir, $FEDGE_STORE_DIR]
            objects/          content-addressed artefacts
            store-key.pem     the store's Ed25519 signing key (private, mode 600)
        runs/RUN_ID/          one simulated run: summary.json, models/ (every round's
                              checkpoint)        [--runs-dir, --out]
        devices/              the simulated devices' own state across runs: lifetime
                              ledgers device-*.jsonl, refusals-*.jsonl  [--devices-dir]
        audit/                the audit trail's anchors: checkpoint-key.pem (signs
                              checkpoints, mode 600), checkpoint-key.pub, and
                              checkpoints.jsonl (every signed checkpoint, appended)
        client/cache/         this device's verified model cache (``fedge client``)
                              [--cache-dir, $FEDGE_CACHE_DIR]

Commands that only read (``fedge store list``, ``fedge audit verify``, ...) never
create anything here; the first command that writes (``fedge sim run``) creates
what it needs.

This module imports only the standard library: ``fedge --help`` must stay fast.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import ConfigError

__all__ = [
    "DEFAULT_HOME",
    "HOME_ENV",
    "HOME_HELP",
    "FedgeHome",
    "check_writable_directory",
    "check_writable_file",
    "resolve_home",
]

HOME_ENV = "FEDGE_HOME"
DEFAULT_HOME = Path("~/.fedge")
HOME_HELP = "The fedge home, where state lives (default: $FEDGE_HOME, else ~/.fedge)."


def resolve_home(explicit: Path | None = None, *, environ: Mapping[str, str] | None = None) -> Path:
    """Return the fedge home: ``explicit``, else ``$FEDGE_HOME``, else ``~/.fedge``.

    Parameters
    ----------
    explicit
        A ``--home`` option's value, if given.
    environ
        The environment to read ``FEDGE_HOME`` from [default: ``os.environ``].

    Returns
    -------
    Path
        The home, ``~`` expanded; it need not exist.
    """
    if explicit is not None:
        return explicit.expanduser()
    value = (os.environ if environ is None else environ).get(HOME_ENV, "")
    return Path(value).expanduser() if value else DEFAULT_HOME.expanduser()


@dataclass(frozen=True, slots=True, kw_only=True)
class FedgeHome:
    """The default state paths under one home directory (see the module docstring)."""

    root: Path

    @classmethod
    def resolve(cls, explicit: Path | None = None) -> FedgeHome:
        """Return the home :func:`resolve_home` picks."""
        return cls(root=resolve_home(explicit))

    @property
    def db_path(self) -> Path:
        """The SQLite database file."""
        return self.root / "fedge.db"

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL of :attr:`db_path`."""
        return f"sqlite:///{self.db_path}"

    @property
    def store_dir(self) -> Path:
        """The model store's directory (objects and the signing key)."""
        return self.root / "store"

    @property
    def runs_dir(self) -> Path:
        """Where simulated runs keep their summaries and checkpoints."""
        return self.root / "runs"

    @property
    def devices_dir(self) -> Path:
        """The simulated devices' own state (lifetime ledgers, refusal logs)."""
        return self.root / "devices"

    @property
    def audit_dir(self) -> Path:
        """The audit trail's anchors: the checkpoint key and the checkpoint file."""
        return self.root / "audit"

    @property
    def cache_dir(self) -> Path:
        """The verified model cache of the device fedge runs on."""
        return self.root / "client" / "cache"


def _existing_ancestor(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_directory(path: Path, label: str, *, label_names_path: bool) -> None:
    directory = path if path.exists() else _existing_ancestor(path)
    if not directory.is_dir():
        if label_names_path and directory is path:
            raise ConfigError(f"{label} is not a directory")
        raise ConfigError(f"{label}: {directory} is not a directory")
    # os.access alone says yes to root on a read-only mount or in /proc: try it.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fedge-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{label}: cannot write in {directory} ({reason})") from None


def check_writable_directory(path: Path, *, option: str) -> None:
    """Fail unless ``path`` is a directory fedge may write to, or one it can create.

    Creates nothing (a probe file is made and removed at once), so a command
    can refuse bad paths before it starts, and before it logs that it started.

    Raises
    ------
    ConfigError
        If ``path`` is not a directory, or it (or the directory it would be
        created in) is not writable.
    """
    _check_directory(path, f"{option} {path}", label_names_path=True)


def check_writable_file(path: Path, *, option: str) -> None:
    """Fail unless fedge may write the file ``path`` (creating its directory if need be).

    Raises
    ------
    ConfigError
        If ``path`` is a directory, an existing file that is not writable, or
        its directory cannot be written or created.
    """
    label = f"{option} {path}"
    if path.is_dir():
        raise ConfigError(f"{label} is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{label} is not writable")
    _check_directory(path.parent, label, label_names_path=False)
