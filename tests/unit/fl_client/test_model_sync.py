"""SyncConfig: every field checked at the boundary with an exact message."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedge.errors import ConfigError
from fl_client.model_sync import SyncConfig

VALID = SyncConfig(
    model="cnn",
    store_url="https://store.example:8443",
    store_key=bytes(32),
    device_dir=Path("device"),
    cache_dir=Path("cache"),
)


def test_the_defaults() -> None:
    assert VALID.ref == "latest"
    assert VALID.prefer == ("model-int8-static.onnx", "model-fp32.onnx")
    assert VALID.ca_file is None and VALID.allow_downgrade is False


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model": "../cnn"}, r"model must match \[A-Za-z0-9_.-\]\{1,64\}, got '../cnn'"),
        ({"store_url": "http://store"}, "the store URL must start with https://"),
        ({"store_key": b"short"}, "store_key must be the store's raw 32-byte Ed25519 public key"),
        ({"ref": "v1?x=y"}, "ref must be a number, an alias or 'latest', got 'v1\\?x=y'"),
        ({"device_dir": "device"}, "device_dir must be a Path, got 'device'"),
        ({"cache_dir": None}, "cache_dir must be a Path, got None"),
        ({"ca_file": "ca.pem"}, "ca_file must be a Path or None, got 'ca.pem'"),
        ({"prefer": ()}, "prefer must be a non-empty tuple of artefact names"),
        ({"prefer": ["model-fp32.onnx"]}, "prefer must be a non-empty tuple of artefact names"),
        ({"prefer": ("",)}, "prefer must be a non-empty tuple of artefact names"),
        ({"allow_downgrade": 1}, "allow_downgrade must be a bool"),
        ({"timeout_s": 0}, "timeout_s must be a finite number > 0, got 0"),
        ({"timeout_s": float("nan")}, "timeout_s must be a finite number > 0, got nan"),
        ({"retries": -1}, "retries must be an int >= 0, got -1"),
        ({"retries": True}, "retries must be an int >= 0, got True"),
    ],
)
def test_a_malformed_field_is_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        replace(VALID, **changes)
