"""Ray's settings for a simulation: a Ray of its own, or the cluster the user names."""

from __future__ import annotations

from simulations.offline import ray_backend_config


def test_without_an_address_the_simulation_starts_its_own_ray() -> None:
    config = ray_backend_config(3, verbose=False)

    # "local": not a cluster that `ray start` left running on this machine, which Ray
    # would otherwise join (and then refuse the CPU count).
    assert config["init_args"]["address"] == "local"
    assert config["init_args"]["num_cpus"] == 3
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_a_named_cluster_is_joined_and_sized_by_itself() -> None:
    config = ray_backend_config(3, verbose=False, address="HEAD:6379")

    assert config["init_args"]["address"] == "HEAD:6379"
    assert "num_cpus" not in config["init_args"]
    assert "object_store_memory" not in config["init_args"]
