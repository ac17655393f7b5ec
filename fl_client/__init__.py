"""The fedge edge client: the Flower ClientApp, its models and local training."""

from edge_runtime.models import ModelName, build_model
from fl_client.app import PartitionProvider, make_client_app
from fl_client.training import TrainConfig

__all__ = ["ModelName", "PartitionProvider", "TrainConfig", "build_model", "make_client_app"]
