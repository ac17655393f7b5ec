"""``fedge edge bench``: what an ONNX model costs on each execution provider of this device."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["bench_model", "edge_app"]

edge_app = typer.Typer(help="Device-side tools: benchmark models on this machine's providers.")


def _median_s(session: Any, batch: np.ndarray, runs: int) -> tuple[float, float]:
    import numpy as np

    from edge_runtime.latency import time_session_runs

    samples = time_session_runs(session, batch, runs)
    return statistics.median(samples), float(np.quantile(samples, 0.99))


def bench_model(model: Path, *, runs: int = 200, threads: int = 1) -> list[dict[str, Any]]:
    """Measure ``model`` on every installed execution provider, side by side.

    Returns, per provider asked for: the provider that really ran (ONNX Runtime
    falls back to the CPU silently), batch-1 p50 and p99 in ms and batch-64
    throughput in inputs/s, on random inputs of the model's input shape.

    Raises
    ------
    ConfigError
        If ``runs`` < 10 or the model's input has fixed, non-batch dynamic dims.
    """
    import numpy as np

    from edge_runtime.providers import installed_providers, open_session

    if runs < 10:
        raise ConfigError(f"runs must be >= 10, got {runs}")
    rows = []
    generator = np.random.default_rng(0)  # benchmark inputs, not secrets
    for provider in installed_providers():
        info = open_session(model, preference=(provider,), intra_op_threads=threads)
        shape = info.session.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"{model}: the input's non-batch dims must be fixed, got {shape}")
        one = generator.random((1, *shape), dtype=np.float32)
        many = generator.random((64, *shape), dtype=np.float32)
        p50, p99 = _median_s(info.session, one, runs)
        batch_s, _ = _median_s(info.session, many, max(10, runs // 10))
        rows.append(
            {
                "requested": provider.value,
                "provider": info.active.value,
                "fallback": info.fallback_reason,
                "p50_ms": round(p50 * 1e3, 4),
                "p99_ms": round(p99 * 1e3, 4),
                "throughput_b64": round(64 / batch_s, 1),
            }
        )
    return rows


@edge_app.command("bench")
def bench_command(
    model: Annotated[Path, typer.Argument(help="An ONNX model file.")],
    runs: Annotated[int, typer.Option("--runs", min=10, help="Timed batch-1 runs.")] = 200,
    threads: Annotated[int, typer.Option("--threads", min=1, help="ORT intra-op threads.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Benchmark an ONNX model on each installed provider: provider really used, p50/p99, b64."""
    rows = bench_model(model, runs=runs, threads=threads)
    if as_json:
        typer.echo(json.dumps({"model": str(model), "providers": rows}, indent=2))
        return
    typer.echo(f"{'asked for':28} {'really ran on':28} {'p50 ms':>8} {'p99 ms':>8} {'b64 /s':>10}")
    for row in rows:
        typer.echo(
            f"{row['requested']:28} {row['provider']:28} {row['p50_ms']:8.3f} "
            f"{row['p99_ms']:8.3f} {row['throughput_b64']:10.0f}"
        )


@edge_app.command("profile")
def profile_command(
    models: Annotated[
        list[Path], typer.Argument(help="The offered variants' ONNX files (name = file name).")
    ],
    runs: Annotated[int, typer.Option("--runs", min=10, help="Timed batch-1 runs each.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
) -> None:
    """Measure this device: providers, memory, CPU features and batch-1 p50 of each variant.

    Prints the device class the rollout controller groups it in (pass it to
    `fedge client models follow --device-class`) and, with --json, the device_profile
    event body the controller chooses per-class variants from.
    """
    from edge_runtime.device_profile import measure_profile

    for path in models:
        if not path.is_file():
            raise ConfigError(f"{path} is not a file")
    profile = measure_profile({path.name: path for path in models}, runs=runs)
    if as_json:
        typer.echo(
            json.dumps({"device_class": profile.device_class, **profile.to_json()}, indent=2)
        )
        return
    typer.echo(f"device class: {profile.device_class}")
    typer.echo(f"providers: {', '.join(profile.providers)}; memory {profile.memory_mb} MB; "
               f"CPU features: {', '.join(profile.cpu_features) or '-'}")  # fmt: skip
    for name, latency in sorted(profile.latency_ms.items(), key=lambda item: item[1]):
        typer.echo(f"  {name:<32} p50 {latency:8.4f} ms")
