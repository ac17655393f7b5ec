"""Reach the MQTT broker: the connection settings, the event topics and a configured paho client.

Devices publish their events on ``<root>/devices/<device id>/events``; the cloud
subscribes to ``<root>/devices/+/events``. Both sides use MQTT 5 through paho-mqtt
with the settings of one :class:`MqttConfig`.

Notes
-----
TLS is required except towards a loopback address (a broker or bridge on the same
host: the bytes never leave it) or with ``insecure_plaintext_for_tests``. Events are
signed either way; TLS adds confidentiality and authenticates the broker, and the
broker's own client authentication (a client certificate, or a user name and a
password read from a private file) lets its ACL confine each device to its topic
(see docs/device-events.md). The password is read when connecting and never logged.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.device_events import check_device_id
from edge_runtime.secret_files import read_secret
from fedge.errors import ConfigError

__all__ = [
    "DEFAULT_TOPIC_ROOT",
    "MqttConfig",
    "connect_properties",
    "device_of_topic",
    "directive_topic",
    "event_topic",
    "event_topic_filter",
    "is_loopback",
    "mqtt_client",
    "start_connecting",
]

DEFAULT_TOPIC_ROOT = "fedge"
_TOPIC_ROOT = re.compile(r"[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9._-]{1,64}){0,3}")
_HOST = re.compile(r"[A-Za-z0-9.:_\[\]-]{1,253}")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def directive_topic(model: str, root: str = DEFAULT_TOPIC_ROOT) -> str:
    """Return the retained topic a model's newest signed release directive lives on."""
    return f"{root}/models/{model}/directive"


def split_broker(address: str, option: str = "--broker") -> tuple[str, int]:
    """Return (host, port) of a ``HOST:PORT`` broker address given as ``option``.

    Raises
    ------
    ConfigError
        If it is not HOST:PORT with a port in [1, 65535].
    """
    host, _, port = address.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{option} takes HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is ``localhost`` or a loopback IP address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def event_topic(device: str, root: str = DEFAULT_TOPIC_ROOT) -> str:
    """Return the topic ``device`` publishes its events on: ``<root>/devices/<device>/events``."""
    return f"{root}/devices/{check_device_id(device)}/events"


def event_topic_filter(root: str = DEFAULT_TOPIC_ROOT) -> str:
    """Return the filter that matches every device's event topic under ``root``."""
    return f"{root}/devices/+/events"


def device_of_topic(topic: str, root: str = DEFAULT_TOPIC_ROOT) -> str | None:
    """Return the device id an event topic names, or ``None`` if it is not one."""
    prefix, suffix = f"{root}/devices/", "/events"
    if not (topic.startswith(prefix) and topic.endswith(suffix)):
        return None
    device = topic[len(prefix) : len(topic) - len(suffix)]
    return device if "/" not in device and device else None


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConfig:
    """Where and how to reach the MQTT broker.

    Parameters
    ----------
    host
        The broker's host name or IP address.
    port
        Its port; ``None`` means 8883 with TLS, 1883 without.
    tls
        Whether to use TLS; plaintext only to a loopback address or with
        ``insecure_plaintext_for_tests``.
    ca_file
        PEM certificates the broker's certificate must chain to (``None``: the
        system's trust store). Requires ``tls``.
    cert_file, key_file
        The client's own certificate and key for mutual TLS (both or neither);
        a broker with ``use_identity_as_username`` maps the certificate to the device.
    username
        The MQTT user name (a broker with a password file: the device id).
    password_file
        A private file (mode 0600) holding the password; requires ``username``.
    keepalive_s
        Seconds between keep-alive pings, 5..3600.
    client_id
        The MQTT client id; a device publisher uses (and requires) its device id.
    topic_root
        The first level(s) of every topic, ``fedge`` by default (tests use their own).
    insecure_plaintext_for_tests
        Allow plaintext to a non-loopback broker. Never in a deployment.

    Raises
    ------
    ConfigError
        If a value is malformed, or the combination would send credentials or
        events in the clear to another host.
    """

    host: str
    port: int | None = None
    tls: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    keepalive_s: int = 60
    client_id: str | None = None
    topic_root: str = DEFAULT_TOPIC_ROOT
    insecure_plaintext_for_tests: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not _HOST.fullmatch(self.host):
            raise ConfigError(f"host must be a host name or IP address, got {self.host!r:.80}")
        if self.port is not None and (type(self.port) is not int or not 0 < self.port < 65536):
            raise ConfigError(f"port must be an int in 1..65535, got {self.port!r:.20}")
        for name in ("tls", "insecure_plaintext_for_tests"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool")
        if not self.tls and not (is_loopback(self.host) or self.insecure_plaintext_for_tests):
            raise ConfigError(
                f"MQTT to {self.host} needs TLS (plaintext is allowed only to a loopback "
                "address, or with insecure_plaintext_for_tests)"
            )
        if not self.tls and any(
            path is not None for path in (self.ca_file, self.cert_file, self.key_file)
        ):
            raise ConfigError("ca_file, cert_file and key_file need tls=True")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together (mutual TLS)")
        if self.password_file is not None and self.username is None:
            raise ConfigError("password_file needs a username")
        if self.username is not None and not (
            isinstance(self.username, str) and 0 < len(self.username) <= 128
        ):
            raise ConfigError("username must have 1..128 characters")
        if type(self.keepalive_s) is not int or not 5 <= self.keepalive_s <= 3600:
            raise ConfigError(f"keepalive_s must be an int in 5..3600, got {self.keepalive_s!r}")
        if self.client_id is not None and not (
            isinstance(self.client_id, str) and _CLIENT_ID.fullmatch(self.client_id)
        ):
            raise ConfigError(
                f"client_id has 1..128 letters, digits or '._-', got {self.client_id!r:.60}"
            )
        if not isinstance(self.topic_root, str) or not _TOPIC_ROOT.fullmatch(self.topic_root):
            raise ConfigError(
                f"topic_root must be 1..4 levels of letters, digits or '._-', "
                f"got {self.topic_root!r:.60}"
            )

    @property
    def effective_port(self) -> int:
        """The port to connect to."""
        if self.port is not None:
            return self.port
        return 8883 if self.tls else 1883

    def describe(self) -> str:
        """Return ``host:port (tls|plaintext)`` for logs: never a credential."""
        return f"{self.host}:{self.effective_port} ({'tls' if self.tls else 'plaintext'})"

    def tls_context(self) -> ssl.SSLContext | None:
        """Return the client's TLS context (TLS 1.2 or later), or ``None`` for plaintext.

        Raises
        ------
        ConfigError
            If a certificate, key or CA file cannot be loaded.
        """
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file)
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None and self.key_file is not None:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"cannot load the MQTT TLS files: {error}") from error
        return context

    def password(self) -> str | None:
        """Return the password from ``password_file`` (one line), or ``None``.

        Raises
        ------
        ConfigError
            If the file is missing, readable by others or not UTF-8.
        """
        if self.password_file is None:
            return None
        try:
            return read_secret(self.password_file).decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(f"the MQTT password file {self.password_file} is not UTF-8") from None


def mqtt_client(
    config: MqttConfig,
    client_id: str,
    *,
    manual_ack: bool = False,
) -> mqtt.Client:
    """Return a paho MQTT 5 client for ``config`` (TLS and credentials set, not connected).

    Raises
    ------
    ConfigError
        If the TLS files or the password file cannot be used.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    context = config.tls_context()
    if context is not None:
        client.tls_set_context(context)
    if config.username is not None:
        client.username_pw_set(config.username, config.password())
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect_properties(
    *, session_expiry_s: int | None = None, receive_maximum: int | None = None
) -> Properties:
    """Return MQTT 5 CONNECT properties (session expiry, receive maximum)."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry_s is not None:
        properties.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    return properties


def start_connecting(
    client: mqtt.Client,
    config: MqttConfig,
    *,
    clean_start: bool,
    session_expiry_s: int | None = None,
    receive_maximum: int | None = None,
) -> None:
    """Start connecting ``client`` to ``config``'s broker (its loop retries while it is down).

    Parameters
    ----------
    client
        A client from :func:`mqtt_client`, its callbacks set.
    config
        The broker's host, port and keep-alive.
    clean_start
        Whether to discard a session the broker kept for this client id.
    session_expiry_s, receive_maximum
        MQTT 5 CONNECT properties, see :func:`connect_properties`.
    """
    client.connect_async(
        config.host,
        config.effective_port,
        keepalive=config.keepalive_s,
        clean_start=clean_start,
        properties=connect_properties(
            session_expiry_s=session_expiry_s, receive_maximum=receive_maximum
        ),
    )
