"""Device profiles: strict parsing, the class key, and a real on-device measurement."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import device_profile as profile_module
from edge_runtime._json import canonical_bytes
from edge_runtime.device_events import MAX_BODY_BYTES
from edge_runtime.device_profile import (
    CPU_FEATURES,
    MAX_ARTEFACTS,
    PROFILE_FORMAT,
    PROVIDERS,
    DeviceProfile,
    measure_profile,
    read_cpu_features,
    total_memory_mb,
)
from edge_runtime.providers import DEFAULT_PREFERENCE, ExecutionProvider
from fedge.errors import ConfigError, DataError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()


def make_profile(**overrides: Any) -> DeviceProfile:
    fields: dict[str, Any] = {
        "providers": (CPU,),
        "memory_mb": 4096,
        "cpu_features": ("avx2",),
        "latency_ms": {"model-fp32.onnx": 0.25, "model-int8-static.onnx": 0.35},
    }
    fields.update(overrides)
    return DeviceProfile(**fields)


def body(**overrides: Any) -> dict[str, Any]:
    raw = make_profile().to_json()
    raw.update(overrides)
    return raw


def write_matmul_model(path: Path, *, features: int, layers: int, input_type: int = 1) -> Path:
    """Write ``x (N, features) -> layers x MatMul(features, features)``: cost grows with both."""
    rng = np.random.default_rng(0)
    nodes, initialisers, current = [], [], "x"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["x_float"], to=TensorProto.FLOAT))
        current = "x_float"
    for layer in range(layers):
        weight = (rng.standard_normal((features, features)) / features).astype(np.float32)
        initialisers.append(numpy_helper.from_array(weight, f"W{layer}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{layer}"], [f"h{layer}"]))
        current = f"h{layer}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", input_type, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initialisers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- the wire form --------------------------------------------------------------------


def test_round_trip_through_canonical_json() -> None:
    profile = make_profile(
        providers=(CUDA, CPU), cpu_features=("avx2", "avx512_vnni", "avx512f"), memory_mb=0
    )
    raw = json.loads(canonical_bytes(profile.to_json()))
    assert raw["format"] == PROFILE_FORMAT
    assert "device_class" not in raw  # recomputed by the cloud, never taken from a device
    parsed = DeviceProfile.from_json(raw)
    assert parsed == profile
    assert parsed.device_class == "cuda"
    assert dict(parsed.latency_ms) == {"model-fp32.onnx": 0.25, "model-int8-static.onnx": 0.35}


def test_latencies_are_frozen_floats() -> None:
    source = {"a": 1, "b": 0}
    profile = make_profile(latency_ms=source)
    source["a"] = 99
    assert dict(profile.latency_ms) == {"a": 1.0, "b": 0.0}
    assert all(type(value) is float for value in profile.latency_ms.values())
    with pytest.raises(TypeError):
        profile.latency_ms["a"] = 2.0  # type: ignore[index]


def test_the_largest_profile_fits_in_an_event_body() -> None:
    largest = make_profile(
        providers=PROVIDERS,
        memory_mb=2**31 - 1,
        cpu_features=CPU_FEATURES,
        latency_ms={f"{index:02d}" + "x" * 62: 1e300 / 3 for index in range(MAX_ARTEFACTS)},
    )
    assert len(canonical_bytes(largest.to_json())) < MAX_BODY_BYTES // 2


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ([], "exactly the keys"),
        ({k: v for k, v in body().items() if k != "memory_mb"}, "exactly the keys"),
        (body(device_class="cuda"), "exactly the keys"),
        (body(format="fedge/device-profile/v2"), "format must be"),
        (body(providers="CPUExecutionProvider"), "providers must be a JSON array"),
        (body(cpu_features={"avx2": True}), "cpu_features must be a JSON array"),
        (body(latency_ms=[["a", 1.0]]), "latency_ms must be a JSON object"),
        (body(providers=[]), "at least one execution provider"),
        (body(providers=["OpenVINOExecutionProvider"]), "providers: unknown name"),
        (body(providers=[7]), "providers: unknown name"),
        (body(providers=[CPU, CPU]), "unique and in the order"),
        (body(providers=[CPU, CUDA]), "unique and in the order"),
        (body(providers=[CPU] * 4), "at most 3 names"),
        (body(memory_mb=True), "memory_mb must be an int"),
        (body(memory_mb=1.5), "memory_mb must be an int"),
        (body(memory_mb=-1), r"memory_mb must be in \[0, 2147483647\]"),
        (body(memory_mb=2**31), r"memory_mb must be in \[0, 2147483647\]"),
        (body(cpu_features=["sse4_2"]), "cpu_features: unknown name 'sse4_2'"),
        (body(cpu_features=["avx512f", "avx2"]), "unique and in the order"),
        (body(cpu_features=["avx2", "avx2"]), "unique and in the order"),
        (body(latency_ms={}), "latency_ms must map 1 to 32"),
        (body(latency_ms={f"m{i}": 1.0 for i in range(33)}), "latency_ms must map 1 to 32"),
        (body(latency_ms={"a/../b": 1.0}), r"artefact name must match \[A-Za-z0-9_.-\]"),
        (body(latency_ms={"x" * 65: 1.0}), "artefact name must match"),
        (body(latency_ms={"": 1.0}), "artefact name must match"),
        (body(latency_ms={"a": True}), r"latency_ms\['a'\] must be a finite number >= 0"),
        (body(latency_ms={"a": "1.0"}), "must be a finite number >= 0"),
        (body(latency_ms={"a": None}), "must be a finite number >= 0"),
        (body(latency_ms={"a": math.nan}), "must be a finite number >= 0"),
        (body(latency_ms={"a": math.inf}), "must be a finite number >= 0"),
        (body(latency_ms={"a": -0.001}), "must be a finite number >= 0"),
    ],
)
def test_from_json_refuses_malformed_profiles(raw: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DeviceProfile.from_json(raw)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"providers": [CPU]}, "providers must be a tuple"),
        ({"cpu_features": ["avx2"]}, "cpu_features must be a tuple"),
        ({"latency_ms": [("a", 1.0)]}, "latency_ms must map"),
    ],
)
def test_the_constructor_wants_tuples_and_a_mapping(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_profile(**overrides)


def test_provider_names_match_the_runtime_preference() -> None:
    assert tuple(provider.value for provider in DEFAULT_PREFERENCE) == PROVIDERS
    assert {provider.value for provider in ExecutionProvider} == set(PROVIDERS)
    assert tuple(sorted(CPU_FEATURES)) == CPU_FEATURES


# --- the class key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("providers", "features", "expected"),
    [
        ((TENSORRT, CUDA, CPU), ("avx2",), "tensorrt"),
        ((TENSORRT, CPU), (), "tensorrt"),
        ((CUDA, CPU), ("amx_int8", "avx2", "avx512_vnni", "avx512f"), "cuda"),
        ((CPU,), ("amx_int8", "avx2", "avx512_vnni", "avx512f"), "cpu-vnni"),
        ((CPU,), ("avx2", "avx512_vnni", "avx512f"), "cpu-vnni"),
        ((CPU,), ("avx2", "avx_vnni"), "cpu-vnni"),
        ((CPU,), ("avx2", "avx512f"), "cpu-avx512"),
        ((CPU,), ("avx2",), "cpu-avx2"),
        ((CPU,), (), "cpu"),
    ],
)
def test_device_class_from_providers_then_the_int8_level(
    providers: tuple[str, ...], features: tuple[str, ...], expected: str
) -> None:
    assert make_profile(providers=providers, cpu_features=features).device_class == expected


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2 adx
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu avx2 avx512f avx512_vnni
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    ("text", "expected", "device_class"),
    [
        (X86_CPUINFO, ("avx2",), "cpu-avx2"),  # the first flags line only
        (
            "flags : avx512_vnni avx2 amx_int8 avx512f avx_vnni sse2\n",
            ("amx_int8", "avx2", "avx512_vnni", "avx512f", "avx_vnni"),
            "cpu-vnni",
        ),
        ("flags\t: fpu sse2 avx\n", (), "cpu"),
        (ARM_CPUINFO, (), "cpu"),
        ("", (), "cpu"),
        (None, (), "cpu"),
    ],
)
def test_cpu_features_from_cpuinfo(
    monkeypatch: pytest.MonkeyPatch,
    text: str | None,
    expected: tuple[str, ...],
    device_class: str,
) -> None:
    monkeypatch.setattr(
        profile_module, "_read_proc", lambda name: text if name == "cpuinfo" else None
    )
    features = read_cpu_features()
    assert features == expected
    assert make_profile(cpu_features=features).device_class == device_class


def test_read_proc_returns_none_for_a_missing_file() -> None:
    assert profile_module._read_proc("no-such-fedge-file") is None


def test_total_memory_from_sysconf() -> None:
    expected = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    assert total_memory_mb() == expected > 0


@pytest.mark.parametrize(
    ("meminfo", "expected"),
    [
        ("MemTotal:       16303412 kB\nMemFree:         1183524 kB\n", 15921),
        ("MemFree:         1183524 kB\n", 0),
        (None, 0),
    ],
)
def test_total_memory_falls_back_to_meminfo(
    monkeypatch: pytest.MonkeyPatch, meminfo: str | None, expected: int
) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    monkeypatch.setattr(
        profile_module, "_read_proc", lambda name: meminfo if name == "meminfo" else None
    )
    assert total_memory_mb() == expected


# --- a real measurement ------------------------------------------------------------------


@pytest.fixture
def two_models(tmp_path: Path) -> dict[str, Path]:
    return {
        "light.onnx": write_matmul_model(tmp_path / "light.onnx", features=8, layers=1),
        "heavy.onnx": write_matmul_model(tmp_path / "heavy.onnx", features=512, layers=8),
    }


def test_measure_profile_times_each_model_on_this_device(two_models: dict[str, Path]) -> None:
    profile = measure_profile(two_models, runs=20, intra_op_threads=1)

    assert set(profile.latency_ms) == {"light.onnx", "heavy.onnx"}
    # 8 x 512^2 multiply-adds against 64: the order cannot be noise.
    assert 0 < profile.latency_ms["light.onnx"] < profile.latency_ms["heavy.onnx"]
    assert profile.providers[-1] == CPU
    assert set(profile.providers) <= set(ort.get_available_providers())
    assert profile.memory_mb == total_memory_mb()
    assert profile.cpu_features == read_cpu_features()
    assert DeviceProfile.from_json(json.loads(canonical_bytes(profile.to_json()))) == profile


def test_measure_profile_on_a_named_provider_reports_that_class(
    two_models: dict[str, Path],
) -> None:
    profile = measure_profile(two_models, runs=10, provider=CPU)
    assert profile.providers == (CPU,)
    assert profile.device_class.startswith("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this test is about a machine without the CUDA provider")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_an_installed_provider_that_does_not_load_is_not_reported(
    two_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The build claims CUDA, but no session can run on it: ORT falls back silently.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    profile = measure_profile(two_models, runs=10)
    assert profile.providers == (CPU,)
    with pytest.raises(ConfigError, match="CUDAExecutionProvider is installed but does not load"):
        measure_profile(two_models, runs=10, provider=CUDA)


@pytest.mark.skipif(HAS_CUDA, reason="this test is about a machine without the CUDA provider")
def test_a_named_provider_that_is_not_installed_is_refused(two_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="CUDAExecutionProvider is not installed"):
        measure_profile(two_models, provider=CUDA)


def test_float16_inputs_are_fed_as_float16(tmp_path: Path) -> None:
    model = write_matmul_model(
        tmp_path / "half.onnx", features=8, layers=1, input_type=TensorProto.FLOAT16
    )
    assert set(measure_profile({"half.onnx": model}, runs=10).latency_ms) == {"half.onnx"}


def test_measure_profile_refuses_a_model_it_cannot_time(tmp_path: Path) -> None:
    ints = write_matmul_model(
        tmp_path / "ints.onnx", features=8, layers=1, input_type=TensorProto.INT64
    )
    with pytest.raises(ConfigError, match=r"input type tensor\(int64\) is not float or float16"):
        measure_profile({"ints.onnx": ints}, runs=10)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
    )
    dynamic = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    dynamic.ir_version = 9
    onnx.save(dynamic, str(tmp_path / "dynamic.onnx"))
    with pytest.raises(ConfigError, match="non-batch dims must be fixed"):
        measure_profile({"dynamic.onnx": tmp_path / "dynamic.onnx"}, runs=10)
    with pytest.raises(DataError, match="does not exist"):
        measure_profile({"missing.onnx": tmp_path / "missing.onnx"}, runs=10)


@pytest.mark.parametrize(
    ("models", "kwargs", "match"),
    [
        ({}, {}, "models must map 1 to 32"),
        ([("a", "a.onnx")], {}, "models must map 1 to 32"),
        ({f"m{i}": "m.onnx" for i in range(33)}, {}, "models must map 1 to 32"),
        ({"bad name": "m.onnx"}, {}, r"a model name must match \[A-Za-z0-9_.-\]"),
        ({"m": "m.onnx"}, {"runs": 9}, r"runs must be an int in \[10, 10000\]"),
        ({"m": "m.onnx"}, {"runs": 10_001}, r"runs must be an int in \[10, 10000\]"),
        ({"m": "m.onnx"}, {"runs": True}, "runs must be an int"),
        ({"m": "m.onnx"}, {"provider": "cpu"}, "provider must be one of"),
    ],
)
def test_measure_profile_checks_its_arguments(
    models: Any, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        measure_profile(models, **kwargs)


def test_fedge_edge_profile_prints_the_class_and_the_event_body(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from fedge.cli import main

    small = write_matmul_model(tmp_path / "small.onnx", features=8, layers=1)
    large = write_matmul_model(tmp_path / "large.onnx", features=64, layers=4)

    assert main(["edge", "profile", str(small), str(large), "--runs", "10", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)

    assert set(document["latency_ms"]) == {"small.onnx", "large.onnx"}
    profile = DeviceProfile.from_json({k: v for k, v in document.items() if k != "device_class"})
    assert document["device_class"] == profile.device_class
    assert main(["edge", "profile", str(tmp_path / "missing.onnx")]) == 1
