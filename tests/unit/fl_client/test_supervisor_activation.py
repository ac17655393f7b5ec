"""The device's supervisor counts a SuperNode as activated only when Flower says so."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fl_client.device_runtime import _SuperNodeSupervisor


def _supervisor(log: Path) -> _SuperNodeSupervisor:
    supervisor = _SuperNodeSupervisor.__new__(_SuperNodeSupervisor)
    supervisor._config = SimpleNamespace(log_file=log)  # type: ignore[assignment]
    return supervisor


def test_only_an_activation_logged_since_this_start_counts(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    # An earlier SuperNode of this device activated; this one has not (yet).
    log.write_bytes(b"INFO : SuperNode ID: 42\nINFO : Starting Flower SuperNode\n")
    supervisor = _supervisor(log)
    supervisor._log_offset = log.stat().st_size
    with log.open("ab") as out:
        out.write(b"WARNING : Connection attempt failed, retrying in 0.4 seconds\n")

    # Up for a while but still retrying: a slow refused node, not an active one.
    assert not supervisor._activated()

    with log.open("ab") as out:
        out.write(b"INFO : SuperNode ID: 15681552422209536161\n")
    assert supervisor._activated()


def test_a_missing_log_is_no_activation(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path / "absent.log")
    supervisor._log_offset = 0

    assert not supervisor._activated()
