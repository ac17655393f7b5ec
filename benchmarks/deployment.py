"""The same secure DP round in Flower's simulation engine and in a real deployment on loopback.

Both variants train fedge's CNN with FedAvg on the same small Fashion-MNIST subset
(``--examples`` per device, an IID split of the first training examples; the server
evaluates on the first ``--eval-examples`` test images), each round aggregated with
fedge SecAgg+ under the active threat model (enrolled identities, consistency check)
and distributed DP (each device clips, rounds and adds discrete Gaussian noise before
masking), with the defaults of ``fedge server init`` (clip range 0.5, 32-bit ring, no
dropout tolerated, L2 clip 1, delta 1e-5, one local epoch of batch 32 at learning rate
0.05), except two: no epsilon limit by default (``--epsilon``), so that every round runs
(the epsilon spent is reported), and noise multiplier 1.1, not 1.0 (``--noise-multiplier``;
see ``_NOTES``: at 1.0, 10 devices enrolled with the default policy refuse every round):

- ``simulation``: ``simulations.run.run_federation`` on Flower's simulation engine
  (Ray, one client per core, the simulated fleet enrolled in process);
- ``loopback``: ``fedge server init`` + ``fedge server start`` (SuperLink, TLS gateway,
  coordinator), one-time tokens, ``fedge client enroll`` per device (timed: the
  median is ``enrol_s_per_device``), then one ``fedge client start`` per device (its
  SuperNode and its long-running ClientApp), every process on this machine, to the
  run's end.

Round times come from each run's summary (``rounds[].seconds``, the coordinator's
own clock in both variants): ``median_round_s`` is over rounds >= 2 (round 1 includes
Ray's start-up, or the devices connecting), ``first_round_s`` is round 1. The
per-stage secure-aggregation seconds come from ``rounds[].secure_aggregation``.
Peak RSS: ``simulation`` sums this process and its descendants (Ray's workers);
``loopback`` sums every process the benchmark started (server, devices, their
SuperNodes and SuperLink), sampled from /proc every 0.25 s, without this process.

Run: ``python -m benchmarks.deployment`` (10 devices, 3 rounds); ``--quick``: 3 devices, 2 rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, machine, write

VARIANTS = ("simulation", "loopback")

# Measured on this machine kind: a device (``fedge client start`` with torch, plus its
# ``flower-supernode``) and the server (coordinator, gateway, SuperLink, with torch).
_DEVICE_MB = 550
_SERVER_MB = 1000

_NOTES = [
    "Flower's SuperNode polls the SuperLink for messages every 3 s when it has nothing "
    "to do (Flower 1.42), and a secure round is several message exchanges (train, then "
    "the SecAgg+ stages): in the loopback variant that polling interval, not compute, "
    "dominates the round time. The simulation engine hands messages over in process.",
    "Round 1 is reported apart (first_round_s): in the simulation it includes Ray "
    "starting its actors, in the deployment the devices connecting.",
    "enrol_s_per_device is the wall time of one `fedge client enroll` process: Python "
    "start-up and imports, key generation, token proof over HTTPS, policy install.",
    "Noise multiplier 1.1, not fedge server init's 1.0: with 10 devices (dropout 0, 10% "
    "corrupt) the server counts on 9 honest contributors and gives each device noise "
    "std z * clip / 3; a device enrolled with the default policy (min_noise_multiplier "
    "0.5 over min_honest_contributors 2) sees z * sqrt(2) / 3 = 0.471 at z = 1 and leaves "
    "every round at masked-input (the run still ends 'completed', the model unchanged). "
    "z >= 1.061 passes; the simulation uses the same z.",
    "load_1m is the 1-minute load average before and after each run: other jobs on this "
    "shared machine (above 2 on 2 cores) slow the loopback variant most.",
    "Both variants run on the same 2-core machine: in the loopback variant every device "
    "process competes for the same cores as the server.",
]


# --- process-tree resident memory, from /proc --------------------------------------------


def _proc_table() -> tuple[dict[int, list[int]], dict[int, int]]:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        pid = int(entry.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return children, rss


def _tree(children: dict[int, list[int]], root: int) -> list[int]:
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


class _PeakRss:
    """Samples the summed RSS of the process trees under ``roots`` (added as they start)."""

    def __init__(self, roots: Sequence[int] = (), interval: float = 0.25) -> None:
        self.roots: list[int] = list(roots)
        self.peak = 0
        self.peak_per_root: dict[int, int] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def sample(self) -> None:
        children, rss = _proc_table()
        total = 0
        for root in list(self.roots):
            size = sum(rss.get(pid, 0) for pid in _tree(children, root))
            self.peak_per_root[root] = max(self.peak_per_root.get(root, 0), size)
            total += size
        self.peak = max(self.peak, total)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _mb(size: int) -> float:
    return round(size / 2**20, 1)


def _mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --- the shared workload --------------------------------------------------------------------


def _sim_config(args: argparse.Namespace) -> Any:
    from secure_agg.params import ThreatModel
    from simulations.config import DpMode, SimConfig
    from simulations.partition import PartitionMode

    # The defaults of `fedge server init`'s fedge-server.toml (see the module docstring).
    return SimConfig(
        num_clients=args.devices,
        num_rounds=args.rounds,
        seed=0,
        partition=PartitionMode.IID,
        train_examples=args.devices * args.examples,
        test_examples=args.eval_examples,
        secure_agg=True,
        threat_model=ThreatModel.ACTIVE,
        clip_range=0.5,
        secagg_dropout=0.0,
        ring_bits=32,
        dp=DpMode.DISTRIBUTED,
        epsilon=args.epsilon,
        delta=1e-5,
        dp_clip=1.0,
        noise_multiplier=args.noise_multiplier,
    )


def _write_data(config: Any, directory: Path) -> list[Path]:
    """Write each device's partition of the simulation, and the server's evaluation set."""
    from simulations.provider import FASHION_MNIST, DatasetPartitions, cached_dataset

    provider = DatasetPartitions(
        FASHION_MNIST, None, config.train_examples, config.partition_config()
    )
    files = []
    for index in range(config.num_clients):
        images, labels = provider(index, config.num_clients)
        path = directory / f"device-{index}.npz"
        np.savez(path, images=images, labels=labels)
        files.append(path)
    test = cached_dataset(None, config.train_examples).test.take(config.test_examples)
    np.savez(directory / "eval.npz", images=test.images, labels=test.labels)
    return files


def _round_figures(rounds: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    """Median round seconds over rounds >= 2, round 1 apart, median stage seconds."""
    seconds = [float(r["seconds"]) for r in rounds]
    measured = rounds[1:] if len(rounds) > 1 else rounds
    laps = [float(r["seconds"]) for r in measured]
    stages: dict[str, list[float]] = {}
    uploads: list[float] = []
    aborted = [
        f"round {r['round']}: {(r.get('secure_aggregation') or {})['aborted']}"
        for r in rounds
        if (r.get("secure_aggregation") or {}).get("aborted")
    ]
    for r in measured:
        secure = r.get("secure_aggregation") or {}
        for stage, value in (secure.get("stage_seconds") or {}).items():
            stages.setdefault(stage, []).append(float(value))
        if secure.get("upload_bytes_per_client") is not None:
            uploads.append(float(secure["upload_bytes_per_client"]))
    figures: dict[str, Any] = {
        "median_round_s": round(statistics.median(laps), 4) if laps else None,
        "min_round_s": round(min(laps), 4) if laps else None,
        "max_round_s": round(max(laps), 4) if laps else None,
        "first_round_s": seconds[0] if seconds else None,
        "round_seconds": seconds,
        "rounds_completed": len(rounds),
        "stage_seconds": {k: round(statistics.median(v), 4) for k, v in stages.items()},
        "upload_bytes_per_client": round(statistics.median(uploads)) if uploads else None,
        "final_accuracy": rounds[-1].get("accuracy") if rounds else None,
    }
    figures["rounds_aborted"] = len(aborted)
    if len(rounds) != expected:
        figures["error"] = f"{len(rounds)} of {expected} rounds completed"
    elif aborted:
        figures["error"] = f"{len(aborted)} of {expected} secure rounds aborted; {aborted[0]}"
    return figures


def _privacy(record: dict[str, Any] | None) -> dict[str, Any]:
    record = record or {}
    return {"epsilon_spent": record.get("epsilon"), "privacy_stopped": record.get("stopped")}


def _empty_entry() -> dict[str, Any]:
    return {
        "median_round_s": None,
        "min_round_s": None,
        "max_round_s": None,
        "first_round_s": None,
        "round_seconds": [],
        "rounds_completed": 0,
        "rounds_aborted": 0,
        "stage_seconds": {},
        "upload_bytes_per_client": None,
        "final_accuracy": None,
        "peak_rss_mb": None,
        "wall_s": None,
        "error": None,
    }


# --- (a) the simulation engine --------------------------------------------------------------


def run_simulation(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the federation on Flower's simulation engine and return its JSON entry."""
    from simulations.run import RunPaths, new_run_id, prepare_data, run_federation

    entry = _empty_entry()
    root = work / "simulation"
    root.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id()
    paths = RunPaths(
        summary=root / "runs" / run_id / "summary.json",
        models=root / "runs" / run_id / "models",
        db_url=f"sqlite:///{root / 'fedge.db'}",
        store=root / "store",
        devices=root / "devices",
    )
    started = time.perf_counter()
    try:
        config = _sim_config(args)
        prepared = prepare_data(config)
        with _PeakRss([os.getpid()]) as rss:
            summary = run_federation(config, paths, run_id=run_id, prepared=prepared)
        rss.sample()
    except Exception as exc:  # a benchmark reports, never hides, a failure
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["wall_s"] = round(time.perf_counter() - started, 2)
        return entry
    entry.update(_round_figures(list(summary.rounds), args.rounds))
    entry["peak_rss_mb"] = _mb(rss.peak)
    entry["wall_s"] = round(time.perf_counter() - started, 2)
    entry["run_status"] = summary.status
    entry.update(_privacy(summary.privacy))
    if entry["error"] is None and summary.status != "completed":
        entry["error"] = f"run {summary.status}"
    return entry


# --- (b) a real deployment on loopback ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _fedge() -> str:
    from edge_runtime.processes import console_script

    return console_script("fedge")


def _set_keys(path: Path, values: dict[str, str]) -> None:
    """Rewrite ``key = value`` lines of fedge-server.toml (keys are unique in the file)."""
    text = path.read_text()
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text)
        if count != 1:
            raise RuntimeError(f"{path}: {count} lines set {key}")
    path.write_text(text)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Processes:
    """Every process the loopback variant starts, each in its own process group."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.started.append(process)
        return process

    def stop(self, grace: float = 20.0) -> int:
        """Terminate every group (the devices first), then kill; return the processes left."""
        groups = [p.pid for p in reversed(self.started)]
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _members(groups):
            for process in self.started:
                process.poll()
            time.sleep(0.2)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        time.sleep(0.5)
        return len(_members(groups))


def _members(groups: Sequence[int]) -> list[int]:
    """The live (not zombie) processes whose process group is one of ``groups``."""
    wanted, found = set(groups), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) in wanted:
            found.append(int(entry.name))
    return found


def _wait_gateway(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"fedge server start exited ({server.returncode}) before serving")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{url}/v1/fedge/ca.pem", verify=False, timeout=2).raise_for_status()
            return
        time.sleep(0.5)
    raise RuntimeError(f"the gateway at {url} did not answer within {timeout:.0f} s")


def _run(argv: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def run_loopback(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the federation as a fedge deployment on loopback and return its JSON entry."""
    entry = _empty_entry()
    entry.update(
        enrol_seconds=[],
        server_peak_rss_mb=None,
        device_peak_rss_mb=None,
        processes_left=None,
        stage_wall_s={},
    )
    needed = _SERVER_MB + args.devices * _DEVICE_MB
    available = _mem_available_mb()
    if available is not None and available < needed * 1.2:
        entry["error"] = (
            f"{args.devices} devices need about {needed} MB "
            f"({_DEVICE_MB} MB each, {_SERVER_MB} MB the server); {available:.0f} MB available"
        )
        return entry
    root = work / "loopback"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FEDGE_HOME=str(root / "home"))
    processes = _Processes(env)
    started = time.perf_counter()
    rss = _PeakRss().__enter__()
    fedge = _fedge()
    phase = "setup"
    try:
        data = _write_data(_sim_config(args), root)
        server_dir = root / "server"
        gateway = _free_port()
        phase = "fedge server init"
        _run(
            [
                fedge,
                "server",
                "init",
                str(server_dir),
                "--san",
                "localhost",
                "--address",
                f"127.0.0.1:{gateway}",
                "--eval-data",
                str(root / "eval.npz"),
            ],
            env,
            phase,
        )
        epsilon = '"none"' if args.epsilon is None else repr(float(args.epsilon))
        _set_keys(
            server_dir / "fedge-server.toml",
            {
                "superlink_port": str(_free_port()),
                "metrics_address": f'"127.0.0.1:{_free_port()}"',
                "rounds": str(args.rounds),
                "min_clients": str(args.devices),
                "clients_per_round": str(args.devices),
                "round_timeout_s": f"{float(args.round_timeout):.1f}",
                "examples": str(args.eval_examples),
                "mode": '"distributed"',
                "epsilon": epsilon,
                "noise_multiplier": repr(float(args.noise_multiplier)),
            },
        )
        phase = "fedge server token create"
        create = [fedge, "server", "token", "create", str(server_dir), "--json"]
        create += ["--count", str(args.devices)]
        tokens = json.loads(_run(create, env, phase))
        phase = "fedge server start"
        rss.roots.append(
            processes.start(
                [fedge, "server", "start", str(server_dir), "--exit-when-done"], logs / "server.log"
            ).pid
        )
        server = processes.started[0]
        url = f"https://localhost:{gateway}"
        _wait_gateway(url, server, timeout=180)
        entry["stage_wall_s"]["server_ready"] = round(time.perf_counter() - started, 2)
        devices = [root / f"device-{i}" for i in range(args.devices)]
        for index, device in enumerate(devices):
            phase = f"fedge client enroll (device {index})"
            enroll = [fedge, "client", "enroll", "--server", url, "--dir", str(device)]
            enroll += ["--token", tokens["tokens"][index]]
            enroll += ["--ca-fingerprint", tokens["ca_fingerprint"]]
            began = time.perf_counter()
            _run(enroll, env, phase)
            entry["enrol_seconds"].append(round(time.perf_counter() - began, 3))
        entry["stage_wall_s"]["enrolled"] = round(time.perf_counter() - started, 2)
        phase = "fedge client start"
        for index, (device, path) in enumerate(zip(devices, data, strict=True)):
            argv = [fedge, "client", "start", "--data", str(path), "--dir", str(device)]
            argv += ["--runtime-port", str(_free_port())]
            rss.roots.append(processes.start(argv, logs / f"device-{index}.log").pid)
        phase = "the run"
        try:
            code = server.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"the run did not finish within {args.timeout} s (--timeout)"
            ) from None
        entry["stage_wall_s"]["run_finished"] = round(time.perf_counter() - started, 2)
        if code != 0:
            raise RuntimeError(f"fedge server start exited {code}: {_tail(logs / 'server.log')}")
        summaries = sorted((server_dir / "runs").glob("*/summary.json"))
        if not summaries:
            raise RuntimeError("the run wrote no summary.json")
        summary = json.loads(summaries[-1].read_text())
        entry.update(_round_figures(list(summary["rounds"]), args.rounds))
        entry["run_status"] = summary.get("status")
        entry.update(_privacy(summary.get("privacy")))
        if entry["error"] is None and summary.get("status") != "completed":
            entry["error"] = f"run {summary.get('status')}"
    except Exception as exc:  # a benchmark reports, never hides, a failure
        entry["error"] = f"{phase}: {type(exc).__name__}: {exc}"
    finally:
        rss.__exit__()
        entry["processes_left"] = processes.stop()
        entry["wall_s"] = round(time.perf_counter() - started, 2)
    if rss.peak:
        entry["peak_rss_mb"] = _mb(rss.peak)
        per_root = [rss.peak_per_root.get(p.pid, 0) for p in processes.started]
        entry["server_peak_rss_mb"] = _mb(per_root[0])
        if len(per_root) > 1:
            entry["device_peak_rss_mb"] = _mb(max(per_root[1:]))
    if entry["processes_left"]:
        entry["error"] = (entry["error"] or "") + f"; {entry['processes_left']} processes left"
    return entry


# --- the comparison -------------------------------------------------------------------------


def _ratio(top: Any, bottom: Any) -> float | None:
    return None if top is None or not bottom else round(float(top) / float(bottom), 3)


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    simulation, loopback = results.get("simulation", {}), results.get("loopback", {})
    stages = {
        stage: _ratio(seconds, simulation.get("stage_seconds", {}).get(stage))
        for stage, seconds in loopback.get("stage_seconds", {}).items()
    }
    return {
        "loopback_over_simulation": _ratio(
            loopback.get("median_round_s"), simulation.get("median_round_s")
        ),
        "loopback_over_simulation_first_round": _ratio(
            loopback.get("first_round_s"), simulation.get("first_round_s")
        ),
        "loopback_over_simulation_stage_seconds": stages,
    }


def _merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per variant: medians over the repeats' medians; every repeat kept."""
    good = [e for e in entries if e["error"] is None]
    if len(entries) == 1 or not good:
        return entries[-1]
    merged = dict(good[0])
    for key in ("median_round_s", "first_round_s", "peak_rss_mb", "wall_s"):
        values = [e[key] for e in good if e.get(key) is not None]
        merged[key] = round(statistics.median(values), 4) if values else None
    merged["min_round_s"] = min(e["min_round_s"] for e in good)
    merged["max_round_s"] = max(e["max_round_s"] for e in good)
    stages: dict[str, list[float]] = {}
    for entry in good:
        for stage, value in entry["stage_seconds"].items():
            stages.setdefault(stage, []).append(value)
    merged["stage_seconds"] = {k: round(statistics.median(v), 4) for k, v in stages.items()}
    if "enrol_seconds" in merged:
        merged["enrol_seconds"] = [s for e in good for s in e["enrol_seconds"]]
    merged["repeats"] = entries
    return merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run both variants (interleaved over repeats), print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10, help="clients (SuperNodes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=300, help="training examples per device")
    parser.add_argument("--eval-examples", type=int, default=500, help="the server's test set")
    parser.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="the run's budget [default: none, spending recorded; fedge server init writes 8, "
        "which distributed DP at noise multiplier 1 passes after 2 rounds]",
    )
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=1.1,
        help="distributed DP's z [default: 1.1; fedge server init writes 1.0, which devices "
        "enrolled with the default policy refuse from 10 devices on: see the notes]",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--timeout", type=float, default=1500.0, help="seconds the loopback run may take"
    )
    parser.add_argument("--round-timeout", type=float, default=600.0, help="round_timeout_s")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    parser.add_argument("--quick", action="store_true", help="3 devices, 2 rounds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.rounds = 3, 2
    from simulations.offline import apply_offline_env

    apply_offline_env()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.keep is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedge-deploy-")))
        else:
            base = args.keep
        for repeat in range(args.repeats):
            for variant in variants if repeat % 2 == 0 else list(reversed(variants)):
                print(f"[{repeat + 1}/{args.repeats}] {variant} ...", flush=True)
                work = base / f"repeat-{repeat}"
                run = run_simulation if variant == "simulation" else run_loopback
                load = os.getloadavg()[0]
                entry = run(args, work)
                entry["load_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                print(f"    {json.dumps(entry)}", flush=True)
                runs[variant].append(entry)
    results = {v: _merge(entries) for v, entries in runs.items()}
    loopback = results.get("loopback", {})
    enrol = loopback.get("enrol_seconds") or []
    document = {
        "benchmark": "deployment",
        "args": {**vars(args), "out": None, "keep": None if args.keep is None else str(args.keep)},
        "machine": machine(),
        "workload": {
            "model": "cnn",
            "devices": args.devices,
            "rounds": args.rounds,
            "examples_per_device": args.examples,
            "eval_examples": args.eval_examples,
            "secure_aggregation": "fedge SecAgg+, active threat model, 32-bit ring, dropout 0",
            "privacy": f"distributed DP, clip 1, noise multiplier {args.noise_multiplier}, "
            "delta 1e-5, "
            f"epsilon budget {'none' if args.epsilon is None else args.epsilon}",
        },
        "variants": results,
        "enrol_s_per_device": round(statistics.median(enrol), 3) if enrol else None,
        "ratios": _ratios(results),
        "wall_s": round(time.perf_counter() - began, 1),
        "notes": _NOTES,
    }
    write(args.out or RESULTS / "deployment.json", document)
    print(json.dumps({k: document[k] for k in ("enrol_s_per_device", "ratios", "wall_s")}))
    for variant, entry in results.items():
        print(
            f"{variant:>10}: median round {entry['median_round_s']} s, first round "
            f"{entry['first_round_s']} s, peak RSS {entry['peak_rss_mb']} MB, "
            f"error {entry['error']}"
        )
    return document


if __name__ == "__main__":
    main()
