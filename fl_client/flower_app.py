"""fedge's ClientApp for Flower's own tooling (``flwr run``, ``flwr-clientapp``).

``fedge client start`` is the way fedge runs a device; this module lets a
Flower user run the same device behind their own SuperNode instead. The node
config names the enrolled device and its data::

    flower-supernode ... --node-config 'device-dir="/var/lib/fedge/device" data="/data/shards"'

Each message is handled by the device's own ClientApp (built once per process
from its policy, identity, budget and data; never from the server's FAB).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.errors import ConfigError
from fl_client.device_home import DeviceHome
from fl_client.device_runtime import device_client_app

__all__ = ["app"]

app = ClientApp()


@cache
def _device_app(device_dir: str, data: str) -> ClientApp:
    client_app, _revocations = device_client_app(DeviceHome(Path(device_dir)), Path(data))
    return client_app


def _node_paths(context: Context) -> tuple[str, str]:
    device_dir = context.node_config.get("device-dir")
    data = context.node_config.get("data")
    if not isinstance(device_dir, str) or not isinstance(data, str) or not device_dir or not data:
        raise ConfigError(
            "the node config must name the enrolled device and its data: "
            '--node-config \'device-dir="DIR" data="PATH"\''
        )
    return device_dir, data


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Hand the message to the device's own ClientApp."""
    return _device_app(*_node_paths(context))(msg, context)
