"""Execution-provider choice reported truthfully, and the optional TensorRT engine path."""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import providers as providers_module
from edge_runtime.providers import (
    DEFAULT_PREFERENCE,
    ExecutionProvider,
    SessionInfo,
    installed_providers,
    open_session,
)
from edge_runtime.tensorrt_engine import build_engine, tensorrt_available
from fedge.errors import ConfigError, DataError

CPU, CUDA, TENSORRT = ExecutionProvider.CPU, ExecutionProvider.CUDA, ExecutionProvider.TENSORRT
SAMPLE_SHAPE = (3, 4)
NUM_CLASSES = 5
HAS_CUDA = CUDA.value in ort.get_available_providers()


def mlp_weights(seed: int, features: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Return the (features, 5) weight and (5,) bias :func:`write_mlp` uses for ``seed``."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((features, NUM_CLASSES)).astype(np.float32),
        rng.standard_normal(NUM_CLASSES).astype(np.float32),
    )


def write_mlp(
    path: Path,
    *,
    seed: int = 0,
    sample_shape: tuple[int, ...] = SAMPLE_SHAPE,
    batch_dim: str | int = "batch",
    elem_type: int = TensorProto.FLOAT,
) -> Path:
    """Write a Flatten + Gemm classifier ``images (N, *sample_shape) -> logits (N, 5)``."""
    weight, bias = mlp_weights(seed, int(np.prod(sample_shape)))
    nodes = [helper.make_node("Flatten", ["images"], ["flat"])]
    if elem_type != TensorProto.FLOAT:
        nodes = [
            helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["as_float"], ["flat"]),
        ]
    nodes.append(helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("images", elem_type, [batch_dim, *sample_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, NUM_CLASSES])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_mlp(tmp_path / "mlp.onnx")


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == providers_module.__name__ and record.levelno == logging.WARNING
    ]


# --- installed providers ------------------------------------------------------------


def test_installed_providers_lists_known_ones_best_first(monkeypatch: pytest.MonkeyPatch) -> None:
    available = ["AzureExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert installed_providers() == [TENSORRT, CPU]


def test_installed_providers_on_this_machine_include_cpu() -> None:
    installed = installed_providers()
    assert CPU in installed
    assert installed == [p for p in DEFAULT_PREFERENCE if p in installed]


# --- fallback reported truthfully ---------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="this test is about a machine without the CUDA provider")
def test_default_preference_falls_back_to_cpu_with_a_reason(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=providers_module.__name__):
        info = open_session(model_path)
    assert info.requested == DEFAULT_PREFERENCE
    assert info.active is CPU
    assert info.session.get_providers()[0] == CPU.value
    assert info.fallback_reason is not None
    assert "CUDAExecutionProvider is not installed" in info.fallback_reason
    assert info.fallback_reason.endswith("running on CPUExecutionProvider")
    assert len(warnings_from(caplog)) == 1


@pytest.mark.skipif(HAS_CUDA, reason="this test is about a machine without the CUDA provider")
def test_require_cuda_on_a_cpu_machine_raises(model_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="CUDAExecutionProvider is required but CPUExecutionProvider is active"
    ):
        open_session(model_path, preference=(CUDA, CPU), require=CUDA)


def test_cpu_preference_has_no_fallback_and_logs_nothing(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=providers_module.__name__):
        info = open_session(model_path, preference=(CPU,), require=CPU, intra_op_threads=1)
    assert (info.active, info.fallback_reason) == (CPU, None)
    assert info.session.get_session_options().intra_op_num_threads == 1
    assert warnings_from(caplog) == []


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_installed_provider_that_does_not_load_is_reported(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretend the build offers CUDA; the real session cannot load it and falls back,
    # as ONNX Runtime does when libcudart or libcudnn is missing.
    if HAS_CUDA:
        pytest.skip("CUDA really loads here")
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with caplog.at_level(logging.WARNING, logger=providers_module.__name__):
        info = open_session(model_path, preference=(CUDA, CPU))
    assert info.active is CPU
    assert info.fallback_reason is not None
    assert "CUDAExecutionProvider is installed but did not load" in info.fallback_reason
    assert len(warnings_from(caplog)) == 1


def test_preference_without_cpu_still_runs_and_says_so(model_path: Path) -> None:
    if HAS_CUDA:
        pytest.skip("CUDA really loads here")
    info = open_session(model_path, preference=(CUDA,))
    assert info.active is CPU
    assert info.fallback_reason is not None
    assert "CPUExecutionProvider is not in the preference" in info.fallback_reason


@pytest.mark.gpu
def test_cuda_is_really_active_on_a_gpu_machine(model_path: Path) -> None:
    if not HAS_CUDA:
        pytest.skip(
            "needs onnxruntime-gpu with the CUDA provider installed (this build is CPU-only)"
        )
    info = open_session(model_path, preference=(CUDA, CPU), require=CUDA)
    assert info.active is CUDA
    assert info.fallback_reason is None
    inputs = np.random.default_rng(0).standard_normal((8, *SAMPLE_SHAPE)).astype(np.float32)
    cpu = open_session(model_path, preference=(CPU,)).session.run(None, {"images": inputs})[0]
    gpu = info.session.run(None, {"images": inputs})[0]
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)


# --- argument and file validation ---------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preference": ()}, "preference must name at least one execution provider"),
        ({"preference": ("CUDAExecutionProvider",)}, "use ExecutionProvider members"),
        ({"preference": (CPU, CPU)}, "preference names a provider twice"),
        ({"require": "CPUExecutionProvider"}, "require must be an ExecutionProvider or None"),
        ({"intra_op_threads": 0}, "intra_op_threads must be a positive int or None"),
        ({"intra_op_threads": True}, "intra_op_threads must be a positive int or None"),
    ],
)
def test_invalid_arguments_raise(model_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_session(model_path, **kwargs)


def test_missing_model_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_session(tmp_path / "absent.onnx")


def test_corrupt_model_raises_one_line_data_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"definitely not a protobuf")
    with pytest.raises(DataError, match="ONNX Runtime cannot load") as raised:
        open_session(path, preference=(CPU,))
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value.__cause__, Exception)


def test_session_info_checks_its_fields(model_path: Path) -> None:
    session = open_session(model_path, preference=(CPU,)).session
    with pytest.raises(ConfigError, match="requested must name at least one"):
        SessionInfo(session=session, requested=(), active=CPU, fallback_reason=None)
    with pytest.raises(ConfigError, match="fallback_reason must be given exactly when"):
        SessionInfo(session=session, requested=(CUDA, CPU), active=CPU, fallback_reason=None)
    with pytest.raises(ConfigError, match="fallback_reason must be given exactly when"):
        SessionInfo(session=session, requested=(CPU,), active=CPU, fallback_reason="why")


# --- TensorRT engine ----------------------------------------------------------------

needs_no_tensorrt = pytest.mark.skipif(
    tensorrt_available(), reason="tensorrt is installed here; this test is about its absence"
)


@needs_no_tensorrt
def test_tensorrt_is_not_available_here_and_build_says_how_to_install(
    model_path: Path, tmp_path: Path
) -> None:
    assert tensorrt_available() is False
    with pytest.raises(ConfigError, match=r"pip install 'fedge\[tensorrt\]'.*NVIDIA GPU"):
        build_engine(model_path, tmp_path / "model.engine")
    assert not (tmp_path / "model.engine").exists()


@needs_no_tensorrt
def test_a_broken_tensorrt_install_is_reported_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        'raise OSError("libnvinfer.so.10: cannot open shared object file")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert tensorrt_available() is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workspace_mb": 0}, "workspace_mb must be at least 1"),
        ({"max_batch": 0}, "max_batch must be at least 1"),
    ],
)
def test_build_engine_checks_arguments(
    model_path: Path, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_engine(model_path, tmp_path / "e.engine", **kwargs)


def test_build_engine_needs_the_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "e.engine")


def fake_tensorrt(
    record: dict[str, Any], *, parses: bool = True, builds: bool = True, shape: Any = (-1, 3, 4)
) -> types.ModuleType:
    """Return a stand-in for the parts of the ``tensorrt`` API that build_engine uses."""
    module = types.ModuleType("tensorrt")
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)

    class Tensor:
        name = "images"

    Tensor.shape = shape  # type: ignore[attr-defined]

    class Network:
        num_inputs = 1

        def get_input(self, index: int) -> Tensor:
            return Tensor()

    class Profile:
        def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
            record["profile"] = (name, *shapes)

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            record["workspace"] = size

        def set_flag(self, flag: str) -> None:
            record.setdefault("flags", []).append(flag)

        def add_optimization_profile(self, profile: Profile) -> None:
            record["profiles"] = record.get("profiles", 0) + 1

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger: object) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def create_builder_config(self) -> Config:
            return Config()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            return b"serialised-engine" if builds else None

    class OnnxParser:
        num_errors = 0 if parses else 1

        def __init__(self, network: Network, logger: object) -> None:
            pass

        def parse(self, data: bytes) -> bool:
            record["parsed_bytes"] = len(data)
            return parses

        def get_error(self, index: int) -> str:
            return "Unsupported ONNX op: Frobnicate"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    module.__dict__.update(
        Logger=Logger,
        Builder=Builder,
        OnnxParser=OnnxParser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(),  # TensorRT 10: no flag
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        BuilderFlag=types.SimpleNamespace(FP16="fp16"),
    )
    return module


def test_build_engine_with_a_tensorrt_stand_in_writes_the_engine_atomically(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(record))
    out = tmp_path / "engines" / "mlp.engine"
    assert tensorrt_available() is True
    assert build_engine(model_path, out, workspace_mb=256, max_batch=32) == out
    assert out.read_bytes() == b"serialised-engine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["mlp.engine"]  # no temp file left
    assert record["parsed_bytes"] == model_path.stat().st_size
    assert record["workspace"] == 256 << 20
    assert record["flags"] == ["fp16"]
    assert record["profile"] == ("images", (1, 3, 4), (16, 3, 4), (32, 3, 4))


def test_build_engine_without_fp16_sets_no_flag(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(record))
    build_engine(model_path, tmp_path / "e.engine", fp16=False)
    assert "flags" not in record


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"parses": False}, "TensorRT cannot parse .*Unsupported ONNX op: Frobnicate"),
        ({"builds": False}, "TensorRT failed to build an engine"),
        ({"shape": (-1, -1, 4)}, "dynamic dimensions other than the batch"),
    ],
)
def test_build_engine_failures_raise_and_write_nothing(
    model_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    message: str,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}, **options))
    with pytest.raises(ConfigError, match=message):
        build_engine(model_path, tmp_path / "e.engine")
    assert not (tmp_path / "e.engine").exists()


def test_the_infer_command_restores_the_loggers_it_quiets() -> None:
    from fl_client.cli import _quiet_loggers

    logger = logging.getLogger(providers_module.__name__)
    before = logger.level
    with _quiet_loggers(providers_module.__name__):
        assert logger.level == logging.ERROR
    assert logger.level == before
