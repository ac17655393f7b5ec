from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edge_runtime.secret_files import read_secret, write_secret
from fedge.errors import ConfigError
from fl_server.enrolment import read_authority, write_authority
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_secret_creates_a_private_file_in_a_private_directory(tmp_path: Path) -> None:
    target = tmp_path / "home" / "keys" / "ca.key"

    write_secret(target, b"secret")

    assert target.read_bytes() == b"secret"
    assert _mode(target) == 0o600
    assert _mode(target.parent) == 0o700
    assert read_secret(target) == b"secret"
    assert [entry.name for entry in target.parent.iterdir()] == ["ca.key"]


def test_write_secret_replaces_an_existing_secret(tmp_path: Path) -> None:
    target = tmp_path / "ca.key"
    write_secret(target, b"old")

    write_secret(str(target), b"new")

    assert read_secret(str(target)) == b"new"
    assert _mode(target) == 0o600


def test_write_secret_refuses_text_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a secret is bytes"):
        write_secret(tmp_path / "x", "text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="is a directory"):
        write_secret(tmp_path, b"x")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_read_secret_refuses_a_file_others_can_access(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "ca.key"
    write_secret(target, b"secret")
    target.chmod(mode)

    with pytest.raises(ConfigError, match=rf"mode {mode:04o}\): run `chmod 600 {target}`"):
        read_secret(target)


def test_read_secret_refuses_a_missing_file_or_a_directory(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)

    with pytest.raises(ConfigError, match="does not exist"):
        read_secret(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_secret(tmp_path)


def test_the_authority_round_trips_through_its_secret_file(tmp_path: Path) -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(3))
    target = tmp_path / "authority.key"

    write_authority(target, authority)

    assert read_authority(target) == authority
    assert _mode(target) == 0o600


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is not a fedge-enrolment-authority/v1 file"),
        (b"other/v1\n" + b"00" * 32 + b"\n", "is not a fedge-enrolment-authority/v1 file"),
        (b"fedge-enrolment-authority/v1\nzz\n", "32-byte authority seed"),
        (b"fedge-enrolment-authority/v1\n" + b"00" * 31 + b"\n", "32-byte authority seed"),
    ],
)
def test_read_authority_refuses_a_malformed_file(
    tmp_path: Path, content: bytes, match: str
) -> None:
    target = tmp_path / "authority.key"
    write_secret(target, content)

    with pytest.raises(ConfigError, match=match):
        read_authority(target)


def test_write_authority_refuses_anything_else(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be an EnrolmentAuthority"):
        write_authority(tmp_path / "a.key", b"seed")  # type: ignore[arg-type]
