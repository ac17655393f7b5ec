"""Device enrolment on the cloud side: one-time tokens, the device registry, revocation."""

from fl_server.enrolment.authority import read_authority, write_authority
from fl_server.enrolment.registry import Device, DeviceRegistry, DeviceStatus, Enrolment
from fl_server.enrolment.tokens import (
    INVALID_TOKEN_MESSAGE,
    TOKEN_PREFIX,
    EnrolmentRefused,
    create_tokens,
    redeem,
)

__all__ = [
    "INVALID_TOKEN_MESSAGE",
    "TOKEN_PREFIX",
    "Device",
    "DeviceRegistry",
    "DeviceStatus",
    "Enrolment",
    "EnrolmentRefused",
    "create_tokens",
    "read_authority",
    "redeem",
    "write_authority",
]
