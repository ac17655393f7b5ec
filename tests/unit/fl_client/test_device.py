"""Device auto-detection and the one training code path on whichever device is chosen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime.models import ModelName, build_model
from fedge.errors import ConfigError
from fl_client import device as device_module
from fl_client.device import DeviceKind, select_device
from fl_client.training import TrainConfig, evaluate, train


def _data(count: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=count)
    images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label : 4 + 2 * label, :] = 250
    return images, labels


def test_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "_cuda_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    assert select_device().device == torch.device("cpu")
    assert "no CUDA or MPS" in select_device().reason

    monkeypatch.setattr(device_module, "_mps_available", lambda: True)
    assert select_device().kind is DeviceKind.MPS

    monkeypatch.setattr(device_module, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    chosen = select_device(DeviceKind.AUTO)
    assert chosen.kind is DeviceKind.CUDA and chosen.reason == "auto: Fake GPU"
    assert select_device(DeviceKind.CPU).kind is DeviceKind.CPU


def test_an_absent_accelerator_asked_for_by_name_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device_module, "_cuda_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda' was asked for"):
        select_device(DeviceKind.CUDA)
    with pytest.raises(ConfigError, match="'mps' was asked for"):
        select_device(DeviceKind.MPS)
    with pytest.raises(ConfigError, match="device must be one of"):
        select_device("cuda")  # type: ignore[arg-type]


def _trained_on(device: torch.device | None) -> tuple[dict[str, torch.Tensor], float]:
    images, labels = _data()
    model = build_model(ModelName.CNN, seed=3)
    result = train(
        model,
        images,
        labels,
        TrainConfig(),
        generator=torch.Generator().manual_seed(9),
        device=device,
    )
    assert all(p.device.type == "cpu" for p in model.parameters())  # handed back on the CPU
    return model.state_dict(), result.mean_loss


def test_training_on_the_selected_cpu_device_equals_the_default_path() -> None:
    default, default_loss = _trained_on(None)
    chosen, chosen_loss = _trained_on(select_device(DeviceKind.CPU).device)
    assert all(torch.equal(default[k], chosen[k]) for k in default)
    assert chosen_loss == default_loss


@pytest.mark.gpu
def test_a_cuda_training_step_matches_the_cpu_within_float_tolerance() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False on this machine)")
    cpu, cpu_loss = _trained_on(torch.device("cpu"))
    gpu, gpu_loss = _trained_on(select_device(DeviceKind.CUDA).device)
    assert abs(cpu_loss - gpu_loss) < 1e-3
    assert all(torch.allclose(cpu[k], gpu[k], atol=1e-3) for k in cpu)
    images, labels = _data()
    model = build_model(ModelName.CNN, seed=3)
    on_gpu = evaluate(model, images, labels, device=torch.device("cuda"))
    on_cpu = evaluate(model, images, labels)
    assert on_gpu.accuracy == on_cpu.accuracy
