"""What each edge variant of a trained model costs and keeps: size, latency, throughput, accuracy.

For the CNN (114k parameters) and the MLP (3.97M), each trained first on real
Fashion-MNIST (centralised SGD, seeded), the variants are: eager torch
(``torch_fp32``), the parity-checked ONNX export (``ort_fp32``, the baseline),
``fp16``, ``int8_static`` (QDQ, calibrated on training images), ``int8_dynamic``,
``int4_weight_only`` (all :func:`edge_runtime.quantize.build_variant`) and
``student_int8``: the teacher pruned by :func:`fl_client.compress.prune_structured`
(whole channels and neurons removed), distilled from the teacher on the training
images, exported and quantised INT8 static.

Latency is batch 1 on one thread (``intra_op_num_threads=1``, torch likewise), after
a warm-up, in blocks that rotate through the variants so they share the machine's
noise; p50/p99 are over every timed run. ``throughput_b64`` is images/s at batch 64,
the median of interleaved single-thread runs. ``provider`` is read back from the
session (``get_providers()[0]``). ``metadata_bytes`` is how much of a file is
per-node debug metadata (stack traces, source paths) that the dynamo exporter writes
and the quantisers keep; ``size_bytes`` is the real file, metadata included.

Writes ``benchmarks/results/edge_variants.json``: ``models.NAME.VARIANT`` with
``size_bytes``, ``accuracy``, ``agreement`` (top-1 with ``ort_fp32``), ``p50_ms``,
``p99_ms``, ``throughput_b64``, ``provider``, ``metadata_bytes``, ``error``;
``ratios.NAME.VARIANT`` (size and p50 over ``ort_fp32``, accuracy delta in points);
``targets.NAME``; ``training.NAME`` (teacher and student); machine, parameters, peak RSS.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from benchmarks._common import RESULTS, machine, peak_rss_mb, write
from edge_runtime.export import export_onnx, strip_debug_metadata
from edge_runtime.models import ModelName, build_model
from edge_runtime.quantize import Precision, build_variant, evaluate_onnx, top1_agreement
from fedge.errors import ConfigError, DataError
from fl_client.compress import prune_structured
from fl_client.distill import DistillConfig, distill
from fl_client.training import TrainConfig, evaluate, images_to_tensor, train
from simulations.data import FashionMNIST, load_fashion_mnist

__all__ = ["VARIANTS", "Settings", "main", "run"]

VARIANTS = (
    "torch_fp32",
    "ort_fp32",
    "fp16",
    "int8_static",
    "int8_dynamic",
    "int4_weight_only",
    "student_int8",
)
_PRECISIONS = {
    "fp16": Precision.FP16,
    "int8_static": Precision.INT8_STATIC,
    "int8_dynamic": Precision.INT8_DYNAMIC,
    "int4_weight_only": Precision.INT4_WEIGHT_ONLY,
}
_MODELS = {"cnn": ModelName.CNN, "mlp": ModelName.MLP}
_BLOCK = 10  # timed batch-1 runs per variant before rotating to the next


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The size of one run; each field is a command-line flag (``--train-examples`` ...).

    Raises
    ------
    ConfigError
        If a count is below 1 or a keep fraction is outside (0, 1].
    """

    train_examples: int = 60_000
    epochs: int = 2
    distill_epochs: int = 1
    eval_examples: int = 10_000
    calibration_examples: int = 256
    latency_runs: int = 300
    throughput_runs: int = 30
    keep_cnn: float = 0.5
    keep_mlp: float = 0.4
    seed: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("keep_") and not 0 < value <= 1:
                raise ConfigError(f"{field.name} must be in (0, 1], got {value}")
            if isinstance(value, int) and field.name != "seed" and value < 1:
                raise ConfigError(f"{field.name} must be >= 1, got {value}")


_HELP = {
    "train_examples": "teacher training and distillation images",
    "epochs": "teacher training epochs",
    "distill_epochs": "student distillation epochs",
    "calibration_examples": "training images calibrating INT8 static",
    "seed": "teacher initialisation, shuffling",
    "eval_examples": "test images for accuracy",
    "latency_runs": "timed batch-1 runs per variant",
    "throughput_runs": "timed batch-64 runs per variant",
    "keep_cnn": "fraction of the CNN's units the student keeps",
    "keep_mlp": "fraction of the MLP's units the student keeps",
}
_QUICK = {"train_examples": 6_000, "epochs": 1, "eval_examples": 2_000, "latency_runs": 200}


@dataclass(slots=True)
class _Variant:
    run: Callable[[np.ndarray], object] | None = None
    provider: str | None = None
    path: Path | None = None
    error: str | None = None


def _ort_runner(path: Path) -> tuple[Callable[[np.ndarray], object], str]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda batch: session.run(None, {name: batch})), str(session.get_providers()[0])


def _torch_runner(model: nn.Module) -> Callable[[np.ndarray], object]:
    model.eval()

    def forward(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    return forward


def _metadata_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    before = int(model.ByteSize())
    strip_debug_metadata(model)
    return before - int(model.ByteSize())


def _timed(forward: Callable[[np.ndarray], object], batch: np.ndarray) -> float:
    started = time.perf_counter()
    forward(batch)
    return time.perf_counter() - started


def _rotations(names: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """Yield (round, name) for ``rounds`` rounds, each starting one variant later."""
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            yield round_, name


def _measure(
    variants: dict[str, _Variant], inputs: np.ndarray, settings: Settings
) -> dict[str, Any]:
    """Time every runnable variant, interleaved: batch-1 p50/p99 and batch-64 throughput."""
    live = {name: v.run for name, v in variants.items() if v.run is not None}
    if not live:
        return {}
    singles = [np.ascontiguousarray(inputs[i : i + 1]) for i in range(min(64, len(inputs)))]
    batch64 = np.ascontiguousarray(inputs[:64])
    single: dict[str, list[float]] = {name: [] for name in live}
    bulk: dict[str, list[float]] = {name: [] for name in live}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for forward in live.values():  # warm-up
            for image in singles[:10]:
                forward(image)
            forward(batch64)
        for round_, name in _rotations(list(live), -(-settings.latency_runs // _BLOCK)):
            live[name](singles[round_ % len(singles)])  # untimed: the switch's cold cache
            for index in range(_BLOCK):
                image = singles[(round_ * _BLOCK + index) % len(singles)]
                single[name].append(_timed(live[name], image))
        for _, name in _rotations(list(live), settings.throughput_runs):
            bulk[name].append(_timed(live[name], batch64))
    finally:
        torch.set_num_threads(threads)
    return {
        name: {
            "p50_ms": round(float(np.median(single[name])) * 1000, 4),
            "p99_ms": round(float(np.percentile(single[name], 99)) * 1000, 4),
            "throughput_b64": round(len(batch64) / float(np.median(bulk[name])), 1),
            "timed_runs": len(single[name]),
        }
        for name in live
    }


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class _Data:
    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.uint8]
    test_images: npt.NDArray[np.uint8]
    test_labels: npt.NDArray[np.uint8]
    inputs: npt.NDArray[np.float32]  # the test images as the models take them
    calibration: npt.NDArray[np.float32]


def _onnx_variants(teacher: nn.Module, key: str, data: _Data, work: Path) -> dict[str, _Variant]:
    fp32 = work / f"{key}-fp32.onnx"
    try:
        export_onnx(teacher, fp32, example=torch.from_numpy(data.inputs[:8]))
    except Exception as exc:  # every ONNX variant needs it: record why they are missing
        missing = f"no ort_fp32: {_error(exc)}"
        return {"ort_fp32": _Variant(error=_error(exc))} | {
            name: _Variant(error=missing) for name in _PRECISIONS
        }
    variants = {"ort_fp32": _Variant(path=fp32)}
    for name, precision in _PRECISIONS.items():
        try:
            out = work / f"{key}-{name}.onnx"
            variants[name] = _Variant(
                path=build_variant(fp32, precision, out, calibration=data.calibration)
            )
        except Exception as exc:  # the JSON records the failure
            variants[name] = _Variant(error=_error(exc))
    return variants


def _student(
    teacher: nn.Module, key: str, data: _Data, settings: Settings, work: Path
) -> tuple[_Variant, dict[str, Any]]:
    """Prune, distil, export and quantise the student; return it and its training record."""
    keep = settings.keep_cnn if key == "cnn" else settings.keep_mlp
    print(f"[edge_variants] {key}: pruning to keep {keep:.0%} of units, distilling")
    record: dict[str, Any] = {"keep_fraction": keep}
    try:
        started = time.perf_counter()
        student = prune_structured(teacher, keep_fraction=keep)
        record["parameters"] = sum(p.numel() for p in student.parameters())
        record["pruned_accuracy"] = evaluate(student, data.test_images, data.test_labels).accuracy
        report = distill(
            teacher,
            student,
            data.images,
            data.labels,
            config=DistillConfig(epochs=settings.distill_epochs, learning_rate=0.01),
            generator=torch.Generator().manual_seed(settings.seed + 1),
        )
        record["distill_s"] = round(time.perf_counter() - started, 1)
        record["epoch_losses"] = [round(loss, 4) for loss in report.epoch_losses]
        record["distilled_accuracy"] = evaluate(
            student, data.test_images, data.test_labels
        ).accuracy
        fp32 = work / f"{key}-student-fp32.onnx"
        record["fp32_size_bytes"] = export_onnx(
            student, fp32, example=torch.from_numpy(data.inputs[:8])
        ).size_bytes
        out = work / f"{key}-student_int8.onnx"
        path = build_variant(fp32, Precision.INT8_STATIC, out, calibration=data.calibration)
        return _Variant(path=path), record
    except Exception as exc:  # the JSON records the failure
        return _Variant(error=_error(exc)), record


def _model(
    key: str, data: _Data, settings: Settings, work: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one teacher, build and measure its variants; return (variants, training)."""
    teacher = build_model(_MODELS[key], seed=settings.seed)
    print(
        f"[edge_variants] {key}: training on {len(data.images)} images x {settings.epochs} epochs"
    )
    started = time.perf_counter()
    config = TrainConfig(local_epochs=settings.epochs, batch_size=64, learning_rate=0.05)
    generator = torch.Generator().manual_seed(settings.seed)
    train(teacher, data.images, data.labels, config, generator=generator)
    teacher_record = {
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "train_s": round(time.perf_counter() - started, 1),
    }
    variants = {"torch_fp32": _Variant(_torch_runner(teacher), "torch-cpu")}
    variants |= _onnx_variants(teacher, key, data, work)
    variants["student_int8"], student_record = _student(teacher, key, data, settings, work)
    accuracy = {"torch_fp32": evaluate(teacher, data.test_images, data.test_labels).accuracy}
    logits: dict[str, np.ndarray] = {}
    for name, variant in variants.items():
        if variant.path is not None and variant.error is None:
            try:
                variant.run, variant.provider = _ort_runner(variant.path)
                accuracy[name], logits[name] = evaluate_onnx(
                    variant.path, data.inputs, data.test_labels
                )
            except Exception as exc:  # the JSON records the failure
                variant.run, variant.error = None, _error(exc)
    print(f"[edge_variants] {key}: timing {[n for n, v in variants.items() if v.run]}")
    timings = _measure(variants, data.inputs, settings)
    checkpoint = io.BytesIO()  # eager torch ships a state dict: its serialised size
    torch.save(teacher.state_dict(), checkpoint)
    results: dict[str, Any] = {}
    for name in VARIANTS:
        variant = variants[name]
        ok = variant.error is None
        path = variant.path if ok else None
        size = checkpoint.getbuffer().nbytes if name == "torch_fp32" else None
        results[name] = {
            "size_bytes": path.stat().st_size if path is not None else size,
            "metadata_bytes": _metadata_bytes(path) if path is not None else None,
            "accuracy": accuracy.get(name) if ok else None,
            "agreement": (
                top1_agreement(logits["ort_fp32"], logits[name])
                if name in logits and "ort_fp32" in logits
                else None
            ),
            **timings.get(name, {"p50_ms": None, "p99_ms": None, "throughput_b64": None}),
            "provider": variant.provider if ok else None,
            "error": variant.error,
        }
    return results, {"teacher": teacher_record, "student": student_record}


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 4)


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    base = results["ort_fp32"]
    return {
        name: {
            "size_over_ort_fp32": _ratio(row["size_bytes"], base["size_bytes"]),
            "p50_over_ort_fp32": _ratio(row["p50_ms"], base["p50_ms"]),
            "accuracy_delta_points": (
                None
                if row["accuracy"] is None or base["accuracy"] is None
                else round(100 * (row["accuracy"] - base["accuracy"]), 2)
            ),
        }
        for name, row in results.items()
        if name != "ort_fp32"
    }


def _targets(ratios: dict[str, Any]) -> dict[str, Any]:
    """Check the edge-variants goals; each gets its bound, measured value and verdict."""
    goals = {
        "int8_static_size_over_fp32_at_most": ("int8_static", "size_over_ort_fp32", 1 / 3.9),
        "int8_static_accuracy_loss_points_at_most": ("int8_static", "accuracy_delta_points", 0.3),
        "int8_static_p50_over_fp32_at_most": ("int8_static", "p50_over_ort_fp32", 0.7),
        "student_int8_size_over_fp32_at_most": ("student_int8", "size_over_ort_fp32", 0.1),
        "student_int8_accuracy_loss_points_at_most": ("student_int8", "accuracy_delta_points", 1.0),
    }
    verdicts: dict[str, Any] = {}
    for goal, (variant, key, bound) in goals.items():
        value = ratios[variant][key]
        measured = None if value is None else (0.0 - value if "loss" in goal else value)
        verdicts[goal] = {
            "target": round(bound, 4),
            "value": measured,
            "met": None if measured is None else measured <= bound,
        }
    return verdicts


def run(settings: Settings, dataset: FashionMNIST, models: tuple[str, ...]) -> dict[str, Any]:
    """Measure every variant of every model in ``models``; return the JSON document."""
    train_split = dataset.train.take(settings.train_examples)
    test_split = dataset.test.take(settings.eval_examples)
    data = _Data(
        images=train_split.images,
        labels=train_split.labels,
        test_images=test_split.images,
        test_labels=test_split.labels,
        inputs=images_to_tensor(test_split.images).numpy(),
        calibration=images_to_tensor(train_split.images[: settings.calibration_examples]).numpy(),
    )
    document: dict[str, Any] = {"models": {}, "ratios": {}, "targets": {}, "training": {}}
    with tempfile.TemporaryDirectory(prefix="fedge-edge-variants-") as tmp:
        for key in models:
            results, training = _model(key, data, settings, Path(tmp))
            document["models"][key] = results
            document["ratios"][key] = _ratios(results)
            document["targets"][key] = _targets(document["ratios"][key])
            document["training"][key] = training
    return document


def _table(document: dict[str, Any]) -> str:
    def cell(value: Any, spec: str) -> str:
        return (
            format("-", ">" + spec.split(".", maxsplit=1)[0])
            if value is None
            else format(value, spec)
        )

    lines = []
    for key, results in document["models"].items():
        lines.append(f"\n{key}: {document['training'][key]}")
        lines.append(
            f"{'variant':17} {'size kB':>9} {'acc %':>6} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'img/s b64':>9} {'size x':>7} {'p50 x':>6} {'dacc':>6}  provider / error"
        )
        for name, row in results.items():
            ratio = document["ratios"][key].get(name, {})
            accuracy = None if row["accuracy"] is None else 100 * row["accuracy"]
            size = None if row["size_bytes"] is None else row["size_bytes"] / 1000
            lines.append(
                f"{name:17} {cell(size, '9.1f')} {cell(accuracy, '6.2f')} "
                f"{cell(row['p50_ms'], '8.4f')} {cell(row['p99_ms'], '8.4f')} "
                f"{cell(row['throughput_b64'], '9.0f')} "
                f"{cell(ratio.get('size_over_ort_fp32'), '7.3f')} "
                f"{cell(ratio.get('p50_over_ort_fp32'), '6.3f')} "
                f"{cell(ratio.get('accuracy_delta_points'), '6.2f')}  "
                f"{row['error'] or row['provider']}"
            )
        for goal, verdict in document["targets"][key].items():
            lines.append(f"  {goal} {verdict['target']}: {verdict['value']} -> {verdict['met']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the benchmark, write its JSON and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in fields(Settings):
        default = getattr(Settings(), field.name)
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, help=_HELP.get(field.name))
    parser.add_argument("--models", default=",".join(_MODELS), help="comma-separated")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST IDX files")
    parser.add_argument("--quick", action="store_true", help=f"{_QUICK} (1-2 minutes)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = tuple(name for name in args.models.split(",") if name)
    if unknown := sorted(set(models) - set(_MODELS)):
        parser.error(f"unknown models {unknown}; choose from {list(_MODELS)}")
    try:
        settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
        settings = replace(settings, **_QUICK) if args.quick else settings
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        data = load_fashion_mnist(args.data_dir)
    except DataError as exc:
        sys.exit(f"edge_variants: {exc}")
    started = time.perf_counter()
    document = run(settings, data, models)
    info = machine()
    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            info["packages"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info["packages"][package] = None
    document = {
        "benchmark": "edge_variants",
        "machine": info,
        "parameters": {**asdict(settings), "quick": args.quick, "models": list(models)},
        **document,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write(args.out or RESULTS / "edge_variants.json", document)
    print(_table(document))
    return document


if __name__ == "__main__":
    main()
