"""A device's enrolment state on disk, and its round policy as installed at enrolment.

Layout (``DIR``: ``fedge client enroll --dir``, default ``$FEDGE_HOME/device``)::

    DIR/device.json          device id, Flower node id, server URL (public)
    DIR/ca.pem               the deployment's CA, pinned by fingerprint at enrolment
    DIR/supernode.key        the Flower SuperNode authentication key (OpenSSH EC P-384, 0600)
    DIR/identity.key         the secure-aggregation identity seed (Ed25519, 0600)
    DIR/identity-cert.json   the authority's certificate for it
    DIR/policy.json          the device's round policy (authority key pinned)
    DIR/superexec.secret     the secret between the SuperNode and the ClientApp (0600)
    DIR/ledger/              the device's lifetime privacy ledger and refusals
    DIR/logs/                supernode.log

The policy is written once, by the device's owner at enrolment (fedge's
defaults, or the ``fedge client enroll`` flags); the server never changes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.secret_files import read_secret
from fedge.errors import ConfigError
from fl_client.policy import DevicePolicy
from secure_agg.identity import IdentityCertificate, NodeIdentity
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy

__all__ = ["DeviceHome", "DeviceRecord", "policy_from_json", "policy_to_json"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord:
    """What enrolment told the device about itself (``device.json``)."""

    device_id: str
    node_id: int
    server_url: str

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document."""
        return {"device_id": self.device_id, "node_id": self.node_id, "server_url": self.server_url}


@dataclass(frozen=True, slots=True)
class DeviceHome:
    """Where a device's enrolment files lie."""

    root: Path

    @property
    def record(self) -> Path:
        """``device.json``."""
        return self.root / "device.json"

    @property
    def ca_cert(self) -> Path:
        """The pinned CA."""
        return self.root / "ca.pem"

    @property
    def supernode_key(self) -> Path:
        """The SuperNode authentication key."""
        return self.root / "supernode.key"

    @property
    def identity_key(self) -> Path:
        """The secure-aggregation identity seed."""
        return self.root / "identity.key"

    @property
    def identity_certificate(self) -> Path:
        """The authority's certificate of the identity key."""
        return self.root / "identity-cert.json"

    @property
    def policy(self) -> Path:
        """The device's round policy."""
        return self.root / "policy.json"

    @property
    def superexec_secret(self) -> Path:
        """The SuperNode <-> ClientApp secret."""
        return self.root / "superexec.secret"

    @property
    def ledger(self) -> Path:
        """The device's lifetime ledger and refusals."""
        return self.root / "ledger"

    @property
    def logs(self) -> Path:
        """Log files."""
        return self.root / "logs"

    def require_enrolled(self) -> DeviceRecord:
        """Return the device record, or fail with one line if the device is not enrolled."""
        if not self.record.is_file():
            raise ConfigError(
                f"this device is not enrolled ({self.record} missing); "
                "run `fedge client enroll --server URL --token T --ca-fingerprint F` first"
            )
        try:
            raw = json.loads(self.record.read_text(encoding="utf-8"))
            return DeviceRecord(
                device_id=str(raw["device_id"]),
                node_id=int(raw["node_id"]),
                server_url=str(raw["server_url"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.record} is damaged: {exc}") from None

    def identity(self) -> NodeIdentity:
        """Return the device's secure-aggregation identity (seed and certificate)."""
        seed = read_secret(self.identity_key)
        try:
            raw = json.loads(self.identity_certificate.read_text(encoding="utf-8"))
            certificate = IdentityCertificate.from_json(raw)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.identity_certificate} is damaged: {exc}") from None
        return NodeIdentity(signing_seed=seed, certificate=certificate)

    def load_policy(self) -> DevicePolicy:
        """Return the device's round policy."""
        try:
            return policy_from_json(json.loads(self.policy.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.policy} is damaged or missing: {exc}") from None


def policy_to_json(policy: DevicePolicy) -> dict[str, Any]:
    """Return the policy as JSON."""
    protocol = policy.protocol
    return {
        "protocol": None
        if protocol is None
        else {
            "threat_model": protocol.threat_model.value,
            "authority_public_key": None
            if protocol.authority_public_key is None
            else protocol.authority_public_key.hex(),
            "ring_bits": sorted(protocol.ring_bits),
            "min_degree": protocol.min_degree,
            "corrupt_fraction": protocol.corrupt_fraction,
            "min_survivors": protocol.min_survivors,
            "max_participants": protocol.max_participants,
            "max_vector_length": protocol.max_vector_length,
            "require_certificate_expiry": protocol.require_certificate_expiry,
        },
        "max_l2_clip": policy.max_l2_clip,
        "min_noise_multiplier": policy.min_noise_multiplier,
        "min_honest_contributors": policy.min_honest_contributors,
        "lifetime_epsilon": policy.lifetime_epsilon,
        "delta": policy.delta,
    }


def _number(raw: dict[str, Any], key: str) -> float:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number")
    return float(value)


def policy_from_json(raw: dict[str, Any]) -> DevicePolicy:
    """Return the policy of a JSON document (validated by the policy's own checks)."""
    protocol_raw = raw["protocol"]
    protocol = None
    if protocol_raw is not None:
        authority = protocol_raw["authority_public_key"]
        protocol = ProtocolPolicy(
            threat_model=ThreatModel(protocol_raw["threat_model"]),
            authority_public_key=None if authority is None else bytes.fromhex(authority),
            ring_bits=frozenset(int(b) for b in protocol_raw["ring_bits"]),
            min_degree=int(protocol_raw["min_degree"]),
            corrupt_fraction=_number(protocol_raw, "corrupt_fraction"),
            min_survivors=int(protocol_raw["min_survivors"]),
            max_participants=int(protocol_raw["max_participants"]),
            max_vector_length=int(protocol_raw["max_vector_length"]),
            require_certificate_expiry=bool(protocol_raw.get("require_certificate_expiry", False)),
        )
    lifetime = raw["lifetime_epsilon"]
    return DevicePolicy(
        protocol=protocol,
        max_l2_clip=_number(raw, "max_l2_clip"),
        min_noise_multiplier=_number(raw, "min_noise_multiplier"),
        min_honest_contributors=int(raw["min_honest_contributors"]),
        lifetime_epsilon=None if lifetime is None else _number(raw, "lifetime_epsilon"),
        delta=_number(raw, "delta"),
    )
