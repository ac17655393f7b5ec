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
def _device_app(device_dir: str, data: str) -> tuple[ClientApp, str]:
    home = DeviceHome(Path(device_dir))
    client_app, _revocations = device_client_app(home, Path(data))
    return client_app, home.require_enrolled().device_id


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
    """Hand the message to the device's own ClientApp, named by its enrolled device id."""
    client_app, device_id = _device_app(*_node_paths(context))
    # As `fedge client start` sets them: the device is its own single partition, and its
    # ledger and refusals are named by its device id.
    context.node_config.update({"device-id": device_id, "partition-id": 0, "num-partitions": 1})
    return client_app(msg, context)
