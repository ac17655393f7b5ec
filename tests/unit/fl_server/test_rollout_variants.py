"""Variants per device class: the fastest above the floor, from medians over devices."""

from __future__ import annotations

import hashlib
import math
import statistics
from typing import Any

import pytest

from edge_runtime.device_profile import DeviceProfile
from edge_runtime.manifest import (
    OFFER_KEY,
    ArtefactEntry,
    ArtefactFormat,
    Manifest,
    Precision,
)
from fedge.errors import ConfigError
from fl_server.rollout.variants import (
    VariantSelection,
    choose_variants,
    offered_accuracy,
    variant_map,
)

CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
AVX2 = ("avx2",)
VNNI = ("avx2", "avx512_vnni", "avx512f")
FP32, FP16, INT8, BAD_INT8 = (
    "model-fp32.onnx",
    "model-fp16.onnx",
    "model-int8-static.onnx",
    "bad-int8.onnx",
)
QUALITY = {FP32: 0.90, FP16: 0.90, INT8: 0.89, BAD_INT8: 0.30}
FLOOR = 0.85
# Devices of one class differ in speed; what a class shares is the ratio between variants.
SPEEDS = (1.0, 2.0, 4.0)


def profile(
    latency: dict[str, float], *, providers: tuple[str, ...] = CPU, features: tuple[str, ...] = AVX2
) -> DeviceProfile:
    return DeviceProfile(
        providers=providers, memory_mb=2048, cpu_features=features, latency_ms=latency
    )


def avx2_device(speed: float) -> DeviceProfile:
    # INT8 static is 1.4x slower than FP32 here; the broken INT8 is fastest of all.
    return profile(
        {FP32: 0.5 * speed, FP16: 0.55 * speed, INT8: 0.7 * speed, BAD_INT8: 0.3 * speed}
    )


def vnni_device(speed: float) -> DeviceProfile:
    return profile(
        {FP32: 0.5 * speed, FP16: 0.55 * speed, INT8: 0.25 * speed, BAD_INT8: 0.2 * speed},
        features=VNNI,
    )


def cuda_device(speed: float) -> DeviceProfile:
    return profile(
        {FP32: 0.2 * speed, FP16: 0.1 * speed, INT8: 0.4 * speed, BAD_INT8: 0.4 * speed},
        providers=CUDA,
    )


def fleet(**classes: list[DeviceProfile]) -> dict[str, DeviceProfile]:
    return {
        f"{name}-{index}": device
        for name, devices in classes.items()
        for index, device in enumerate(devices)
    }


def choose(profiles: dict[str, DeviceProfile], **kwargs: Any) -> VariantSelection:
    kwargs.setdefault("accuracy_floor", FLOOR)
    return choose_variants(profiles, QUALITY, **kwargs)


# --- the choice per class ------------------------------------------------------------------


def test_int8_where_it_is_faster_fp32_where_it_is_slower_fp16_on_the_gpu() -> None:
    profiles = fleet(
        avx2=[avx2_device(s) for s in SPEEDS],
        vnni=[vnni_device(s) for s in SPEEDS],
        cuda=[cuda_device(s) for s in SPEEDS],
    )

    selection = choose(profiles)

    assert variant_map(selection) == {"cpu-avx2": FP32, "cpu-vnni": INT8, "cuda": FP16}
    assert dict(selection.skipped) == {}
    avx2 = selection.choices["cpu-avx2"]
    assert (avx2.device_class, avx2.artefact, avx2.accuracy, avx2.devices) == (
        "cpu-avx2",
        FP32,
        0.90,
        3,
    )
    assert avx2.median_latency_ms == pytest.approx(1.0)
    summary = [
        (c.artefact, round(c.median_latency_ms, 9), c.accuracy, c.devices) for c in avx2.runners_up
    ]
    assert summary == [(FP16, 1.1, 0.90, 3), (INT8, 1.4, 0.89, 3)]
    relative = [c.relative_latency or 0.0 for c in avx2.runners_up]
    assert relative == pytest.approx([1.1, 1.4])
    vnni = selection.choices["cpu-vnni"]
    assert vnni.median_latency_ms == pytest.approx(0.5)
    assert [c.artefact for c in vnni.runners_up] == [FP32, FP16]


def test_the_floor_excludes_the_fastest_but_inaccurate_variant() -> None:
    profiles = fleet(avx2=[avx2_device(s) for s in SPEEDS], vnni=[vnni_device(s) for s in SPEEDS])

    selection = choose(profiles)

    assert selection.below_floor == (BAD_INT8,)
    assert BAD_INT8 not in variant_map(selection).values()
    for choice in selection.choices.values():
        assert BAD_INT8 not in [c.artefact for c in choice.runners_up]
    # Lower the floor under its accuracy and it wins on the VNNI class, where it is fastest.
    assert choose(profiles, accuracy_floor=0.3).choices["cpu-vnni"].artefact == BAD_INT8


def test_a_class_with_no_variant_above_the_floor_is_named_in_skipped() -> None:
    selection = choose(fleet(avx2=[avx2_device(s) for s in SPEEDS]), accuracy_floor=0.95)

    assert variant_map(selection) == {}
    assert selection.below_floor == tuple(sorted(QUALITY))
    assert "no artefact at or above the accuracy floor" in selection.skipped["cpu-avx2"]


def test_a_class_with_too_few_devices_is_skipped() -> None:
    profiles = fleet(avx2=[avx2_device(s) for s in SPEEDS], vnni=[vnni_device(1.0)] * 2)

    selection = choose(profiles)

    assert variant_map(selection) == {"cpu-avx2": FP32}
    assert selection.skipped["cpu-vnni"] == "2 device(s) reported, fewer than min_devices=3"
    assert variant_map(choose(profiles, min_devices=2)) == {"cpu-avx2": FP32, "cpu-vnni": INT8}


def test_profiles_of_other_artefacts_are_ignored() -> None:
    other_model = [profile({"other-model.onnx": 0.01}) for _ in range(5)]
    profiles = fleet(avx2=[avx2_device(1.0), avx2_device(2.0)], other=other_model)

    selection = choose(profiles)

    assert "fewer than min_devices" in selection.skipped["cpu-avx2"]
    assert selection.skipped["cpu-avx2"].startswith("2 device(s)")


# --- hostile devices ---------------------------------------------------------------------


def test_one_hostile_device_cannot_flip_a_class_choice() -> None:
    honest = [avx2_device(s) for s in SPEEDS]
    hostile = profile({FP32: 1000.0, FP16: 1000.0, INT8: 0.0, BAD_INT8: 0.0})
    profiles = fleet(avx2=[*honest, hostile])
    # A median of absolute latencies would flip: it lands on different honest devices.
    assert statistics.median(p.latency_ms[INT8] for p in profiles.values()) < statistics.median(
        p.latency_ms[FP32] for p in profiles.values()
    )

    selection = choose(profiles)

    choice = selection.choices["cpu-avx2"]
    assert (choice.artefact, choice.devices) == (FP32, 4)
    assert [c.artefact for c in choice.runners_up] == [FP16, INT8]
    # Nor can it with only two honest devices beside it.
    assert variant_map(choose(fleet(avx2=[*honest[:2], hostile]))) == {"cpu-avx2": FP32}


def test_a_variant_one_device_alone_measured_is_not_a_candidate() -> None:
    honest = [profile({FP32: 0.5 * s}) for s in SPEEDS]
    hostile = profile({FP32: 1000.0, INT8: 0.001})

    choice = choose(fleet(avx2=[*honest, hostile])).choices["cpu-avx2"]

    assert (choice.artefact, choice.runners_up) == (FP32, ())


def test_too_few_shared_measurements_make_a_tie_that_accuracy_breaks() -> None:
    # INT8 and FP32 are each measured by 3 devices, but only one device measured both.
    devices = [
        profile({FP32: 1.0, INT8: 0.1}),
        profile({FP32: 1.0}),
        profile({FP32: 1.0}),
        profile({INT8: 0.1}),
        profile({INT8: 0.1}),
    ]

    choice = choose(fleet(avx2=devices)).choices["cpu-avx2"]

    assert choice.artefact == FP32
    assert choice.runners_up[0].relative_latency is None


def test_zero_latencies_do_not_break_the_ratios() -> None:
    choice = choose(fleet(avx2=[profile({FP32: 0.0, INT8: 0.0})] * 3)).choices["cpu-avx2"]
    assert choice.artefact == FP32  # a tie, broken toward accuracy
    assert choice.runners_up[0].relative_latency == 1.0


# --- ties ----------------------------------------------------------------------------------


def test_a_near_tie_goes_to_the_more_accurate_variant() -> None:
    quality = {FP32: 0.90, INT8: 0.89}
    devices = [profile({FP32: 1.0 * s, INT8: 0.98 * s}) for s in SPEEDS]

    assert variant_map(choose_variants(fleet(a=devices), quality, accuracy_floor=0.8)) == {
        "cpu-avx2": FP32
    }
    assert variant_map(
        choose_variants(fleet(a=devices), quality, accuracy_floor=0.8, tie_tolerance=0.0)
    ) == {"cpu-avx2": INT8}


def test_an_exact_tie_in_speed_and_accuracy_is_decided_by_name() -> None:
    quality = {"b.onnx": 0.9, "a.onnx": 0.9, "c.onnx": 0.91}
    devices = [profile({"a.onnx": 1.0, "b.onnx": 1.0, "c.onnx": 1.01})] * 3

    tolerant = choose_variants(fleet(x=devices), quality, accuracy_floor=0.5)
    strict = choose_variants(fleet(x=devices), quality, accuracy_floor=0.5, tie_tolerance=0.0)

    # 1 % slower is a tie at the default tolerance, which c's accuracy wins ...
    assert variant_map(tolerant) == {"cpu-avx2": "c.onnx"}
    assert [c.artefact for c in tolerant.choices["cpu-avx2"].runners_up] == ["a.onnx", "b.onnx"]
    # ... and a loss without one; a and b tie in everything, and a comes first by name.
    assert variant_map(strict) == {"cpu-avx2": "a.onnx"}
    assert [c.artefact for c in strict.choices["cpu-avx2"].runners_up] == ["b.onnx", "c.onnx"]


# --- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profiles", "quality", "kwargs", "match"),
    [
        ([avx2_device(1.0)], QUALITY, {}, "profiles must map device ids to DeviceProfile"),
        ({"d": {"latency_ms": {}}}, QUALITY, {}, r"profiles must map device ids \(str\)"),
        ({1: avx2_device(1.0)}, QUALITY, {}, r"profiles must map device ids \(str\)"),
        ({}, [(FP32, 0.9)], {}, "quality must map artefact names"),
        ({}, {FP32: math.nan}, {}, r"quality\['model-fp32.onnx'\] must be a finite number"),
        ({}, {FP32: True}, {}, "must be a finite number"),
        ({}, {FP32: "0.9"}, {}, "must be a finite number"),
        ({}, QUALITY, {"accuracy_floor": math.inf}, "accuracy_floor must be a finite number"),
        ({}, QUALITY, {"min_devices": 0}, "min_devices must be an int >= 1"),
        ({}, QUALITY, {"min_devices": True}, "min_devices must be an int >= 1"),
        ({}, QUALITY, {"tie_tolerance": 1.0}, r"tie_tolerance must be in \[0, 1\)"),
        ({}, QUALITY, {"tie_tolerance": -0.01}, r"tie_tolerance must be in \[0, 1\)"),
        ({}, QUALITY, {"tie_tolerance": math.nan}, "tie_tolerance must be a finite number"),
    ],
)
def test_arguments_are_checked(
    profiles: Any, quality: Any, kwargs: dict[str, Any], match: str
) -> None:
    kwargs.setdefault("accuracy_floor", FLOOR)
    with pytest.raises(ConfigError, match=match):
        choose_variants(profiles, quality, **kwargs)


def test_no_profiles_choose_nothing() -> None:
    selection = choose({})
    assert (variant_map(selection), dict(selection.skipped)) == ({}, {})


# --- signed accuracies -------------------------------------------------------------------


def manifest(offer: dict[str, Any] | None) -> Manifest:
    names = (FP32, INT8, BAD_INT8, "labels.json")
    return Manifest(
        model="cnn",
        version=3,
        parent=None,
        artefacts=tuple(
            ArtefactEntry(
                name=name,
                digest=hashlib.sha256(name.encode()).hexdigest(),
                size=10,
                format=ArtefactFormat.JSON if name.endswith(".json") else ArtefactFormat.ONNX,
                precision=Precision.INT8 if "int8" in name else Precision.FP32,
            )
            for name in names
        ),
        metadata={} if offer is None else {OFFER_KEY: offer},
        created_at="2026-01-31T12:00:00Z",
    )


def test_offered_accuracy_reads_the_signed_offer() -> None:
    signed = manifest(
        {
            FP32: {"status": "offered", "quality": {"accuracy": 0.9, "p50_ms": 0.5}},
            INT8: {"status": "offered", "quality": {"accuracy": 0.89}},
            BAD_INT8: {"status": "rejected", "quality": {"accuracy": 0.3}},
            "labels.json": {"status": "offered", "quality": {}},
        }
    )
    assert offered_accuracy(signed) == {FP32: 0.9, INT8: 0.89}
    assert offered_accuracy(signed, metric="p50_ms") == {FP32: 0.5}


def test_offered_accuracy_refuses_a_manifest_without_a_signed_offer() -> None:
    with pytest.raises(ConfigError, match="cnn v3 carries no signed offer"):
        offered_accuracy(manifest(None))
