"""``fedge client enroll``: make the device's keys, prove a token, install the policy.

The device trusts nothing it has not pinned: it fetches the deployment's CA
certificate over an unverified connection only to compare its fingerprint with
the one its operator gave it (``--ca-fingerprint sha256:...``, printed by
``fedge server token create``) or uses a CA file given out of band
(``--ca-cert``); every later request verifies the server against that CA.

The device makes both its keys itself with the OS CSPRNG (the SuperNode
authentication key, EC P-384; the secure-aggregation identity, Ed25519) and
sends only the public halves. The reply's certificate must verify with the
authority key it carries, which the device pins in its policy from then on.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from edge_runtime.secret_files import write_secret
from edge_runtime.tls import pinned_client_context
from fedge.errors import ConfigError, FedgeError
from fl_client.device_home import (
    DeviceHome,
    DeviceRecord,
    policy_to_json,
)
from fl_client.policy import DevicePolicy
from secure_agg.crypto import signing_key_from_seed
from secure_agg.errors import CryptoError
from secure_agg.identity import IdentityCertificate
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy

__all__ = ["EnrolmentError", "PolicyChoices", "enrol_device", "fingerprint_of"]

_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_DEVICE_ID = re.compile(r"dev-[0-9a-f]{8,64}")
_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class EnrolmentError(FedgeError, RuntimeError):
    """The server refused the enrolment, or its answer did not check out."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyChoices:
    """What the device's owner sets at enrolment (fedge's defaults otherwise)."""

    lifetime_epsilon: float | None = None
    max_l2_clip: float = 10.0
    min_noise_multiplier: float = 0.5
    min_survivors: int = 2
    min_degree: int = 2


def fingerprint_of(ca_pem: bytes) -> str:
    """Return ``sha256:HEX`` of a PEM certificate's DER bytes."""
    try:
        der = x509.load_pem_x509_certificate(ca_pem).public_bytes(Encoding.DER)
    except ValueError:
        raise EnrolmentError("the server's CA certificate is not a PEM certificate") from None
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _pinned_ca(server_url: str, ca_fingerprint: str | None, ca_cert: Path | None) -> bytes:
    if ca_cert is not None:
        try:
            pem = ca_cert.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --ca-cert {ca_cert}: {exc.strerror}") from None
        fingerprint_of(pem)
        return pem
    if ca_fingerprint is None or not _FINGERPRINT.fullmatch(ca_fingerprint):
        raise ConfigError("give --ca-fingerprint sha256:<64 hex digits> or --ca-cert FILE")
    try:
        # Unverified on purpose, once: the fingerprint check below is the trust decision.
        answer = httpx.get(f"{server_url}/v1/fedge/ca.pem", verify=False, timeout=_TIMEOUT)  # noqa: S501
    except httpx.HTTPError as exc:
        raise EnrolmentError(f"cannot reach {server_url}: {exc}") from None
    if answer.status_code != 200 or len(answer.content) > 64 * 1024:
        raise EnrolmentError(f"{server_url} did not serve its CA certificate")
    pem = answer.content
    if not secrets.compare_digest(fingerprint_of(pem), ca_fingerprint):
        raise EnrolmentError(
            "the server's CA does not match --ca-fingerprint: refusing to enrol "
            "(wrong server, or a machine in the middle)"
        )
    return pem


def _device_policy(authority: bytes, choices: PolicyChoices) -> DevicePolicy:
    return DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=ThreatModel.ACTIVE,
            authority_public_key=authority,
            min_degree=choices.min_degree,
            min_survivors=choices.min_survivors,
            # The deployment's authority issues expiring certificates only.
            require_certificate_expiry=True,
        ),
        max_l2_clip=choices.max_l2_clip,
        min_noise_multiplier=choices.min_noise_multiplier,
        lifetime_epsilon=choices.lifetime_epsilon,
    )


def _checked_reply(raw: object, identity_public: bytes) -> tuple[str, int, bytes, Any]:
    if not isinstance(raw, dict):
        raise EnrolmentError("the server's enrolment reply is not a JSON object")
    try:
        device_id = str(raw["device_id"])
        node_id = int(raw["node_id"])
        authority = bytes.fromhex(str(raw["authority_public_key"]))
        certificate = IdentityCertificate.from_json(raw["certificate"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EnrolmentError(f"the server's enrolment reply is malformed: {exc}") from None
    if not _DEVICE_ID.fullmatch(device_id) or not 0 <= node_id < 2**64:
        raise EnrolmentError("the server's enrolment reply names no valid device")
    if certificate.enrolment_id != device_id or certificate.public_key != identity_public:
        raise EnrolmentError("the certificate is not for this device's key")
    if certificate.expires_at is None:
        raise EnrolmentError("the certificate has no expiry (this server is too old or forged)")
    try:
        certificate.verify_at_time(authority, int(time.time()))
    except CryptoError:
        raise EnrolmentError("the certificate does not verify with the authority key") from None
    return device_id, node_id, authority, certificate


def enrol_device(
    server_url: str,
    token: str,
    directory: Path,
    *,
    ca_fingerprint: str | None = None,
    ca_cert: Path | None = None,
    choices: PolicyChoices | None = None,
) -> DeviceRecord:
    """Enrol this device with the server at ``server_url``; write its state to ``directory``.

    Raises
    ------
    ConfigError
        If an argument is malformed or ``directory`` already holds an enrolment.
    EnrolmentError
        If the server is unreachable, its CA does not match, it refuses the
        token, or its reply does not verify. Nothing is left in ``directory``.
    """
    if not server_url.startswith("https://"):
        raise ConfigError(f"--server must be an https:// URL, got {server_url!r}")
    server_url = server_url.rstrip("/")
    home = DeviceHome(directory)
    if home.record.exists():
        raise ConfigError(f"{directory} already holds an enrolled device ({home.record})")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    ca_pem = _pinned_ca(server_url, ca_fingerprint, ca_cert)
    supernode_key = ec.generate_private_key(ec.SECP384R1())
    supernode_public = supernode_key.public_key().public_bytes(
        Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    identity_seed = secrets.token_bytes(32)
    identity_public = signing_key_from_seed(identity_seed).public_key().public_bytes_raw()
    try:
        with httpx.Client(verify=pinned_client_context(ca_pem), timeout=_TIMEOUT) as client:
            answer = client.post(
                f"{server_url}/v1/fedge/enroll",
                json={
                    "token": token,
                    "supernode_public_key": supernode_public.decode("ascii"),
                    "identity_public_key": identity_public.hex(),
                },
            )
    except httpx.HTTPError as exc:
        raise EnrolmentError(f"cannot reach {server_url}: {exc}") from None
    if answer.status_code != 200:
        try:
            reason = str(answer.json().get("error", ""))[:300]
        except ValueError:
            reason = ""
        raise EnrolmentError(f"the server refused the enrolment ({answer.status_code}): {reason}")
    try:
        raw = answer.json()
    except ValueError:
        raise EnrolmentError("the server's enrolment reply is not JSON") from None
    device_id, node_id, authority, certificate = _checked_reply(raw, identity_public)
    record = DeviceRecord(device_id=device_id, node_id=node_id, server_url=server_url)
    policy = _device_policy(authority, choices or PolicyChoices())
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        home.ca_cert.write_bytes(ca_pem)
        write_secret(
            home.supernode_key,
            supernode_key.private_bytes(
                Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        write_secret(home.identity_key, identity_seed)
        write_secret(home.superexec_secret, secrets.token_bytes(32))
        home.identity_certificate.write_text(
            json.dumps(certificate.to_json(), indent=2) + "\n", encoding="utf-8"
        )
        home.policy.write_text(json.dumps(policy_to_json(policy), indent=2) + "\n", "utf-8")
        # Written last: its presence says the enrolment is complete.
        home.record.write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise ConfigError(f"cannot write the device's state to {directory}: {exc}") from None
    return record
