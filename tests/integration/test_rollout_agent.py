"""The device's rollout agent against a real store server: signed directives in, verified swaps."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.cache import ModelCache
from edge_runtime.device_events import EventKind
from edge_runtime.directive_guard import Action, DirectiveRefused
from edge_runtime.fetch import FetchError
from edge_runtime.release import DirectiveKind, ReleaseDirective, SignedDirective
from fl_client.model_sync import SyncConfig, SyncResult, sync_model
from fl_client.rollout_agent import RolloutAgent
from fl_server.store.keys import StoreKey
from tests.integration.test_models_sync import Deployment


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    created = Deployment(tmp_path)
    created.start()
    for label in ("v1", "v2", "v3"):
        created.publish(label)
    try:
        yield created
    finally:
        created.stop()
        created.engine.dispose()


def directive(
    key: StoreKey, sequence: int, version: int, kind: DirectiveKind = DirectiveKind.ROLLOUT
) -> SignedDirective:
    return key.sign_directive(
        ReleaseDirective(
            model="cnn",
            version=version,
            kind=kind,
            rollout_id="cnn-v2-aaaaaa",
            sequence=sequence,
            cohort_fraction=1.0,
            previous=1 if kind is DirectiveKind.ROLLOUT else version,
            issued_at=time.time(),
        )
    )


def agent(deployment: Deployment, reports: list[tuple[EventKind, dict[str, Any]]]) -> RolloutAgent:
    config = SyncConfig(
        model="cnn",
        store_url=deployment.url,
        store_key=deployment.key.public_key_bytes(),
        device_dir=deployment.device_dir,
        cache_dir=deployment.cache_dir,
    )
    return RolloutAgent(
        config, device_id="device-7", report=lambda kind, body: reports.append((kind, body))
    )


def current(deployment: Deployment) -> int | None:
    installed = ModelCache(
        deployment.cache_dir, trusted_key=deployment.key.public_key_bytes()
    ).current("cnn")
    return None if installed is None else installed.version


def test_the_agent_follows_a_rollout_and_a_signed_rollback_and_nothing_else(
    deployment: Deployment,
) -> None:
    reports: list[tuple[EventKind, dict[str, Any]]] = []
    device = agent(deployment, reports)

    assert device.handle(directive(deployment.key, 1, 1), current=None).action is Action.INSTALL
    assert device.handle(directive(deployment.key, 2, 2), current=1).action is Action.INSTALL
    assert current(deployment) == 2
    rollback = directive(deployment.key, 3, 1, DirectiveKind.ROLLBACK)
    assert device.handle(rollback, current=2).action is Action.ROLLBACK
    assert current(deployment) == 1  # an older version, because the store key said so
    assert [(body["version"], body["rollback"]) for _, body in reports] == [
        (1, False),
        (2, False),
        (1, True),
    ]

    # A replay of the withdrawn rollout, a backwards rollout and a forged rollback: refused.
    with pytest.raises(DirectiveRefused, match="not newer than 3"):
        device.handle(directive(deployment.key, 2, 2), current=1)
    device.handle(directive(deployment.key, 4, 3), current=1)
    assert current(deployment) == 3
    with pytest.raises(DirectiveRefused, match="never moves a device back"):
        device.handle(directive(deployment.key, 5, 2), current=3)
    forged = directive(StoreKey.generate(), 6, 1, DirectiveKind.ROLLBACK)
    with pytest.raises(DirectiveRefused, match="signed by key"):
        device.handle(forged, current=3)
    assert current(deployment) == 3
    # The sequence acted on survives a restart of the agent.
    with pytest.raises(DirectiveRefused, match="not newer than 4"):
        agent(deployment, []).handle(directive(deployment.key, 4, 3), current=3)


def test_a_failed_fetch_changes_nothing_and_the_directive_stays_pending(
    deployment: Deployment,
) -> None:
    failures = [FetchError("cannot reach the store (injected)")]

    def flaky(config: SyncConfig) -> SyncResult:
        if failures:
            raise failures.pop()
        return sync_model(config)

    device = agent(deployment, [])
    device.handle(directive(deployment.key, 1, 1), current=None)
    device = RolloutAgent(device.config, device_id="device-7", syncer=flaky)

    with pytest.raises(FetchError):
        device.handle(directive(deployment.key, 2, 2), current=1)

    assert current(deployment) == 1
    # The same directive is acted on when the store answers again (never marked done).
    assert device.handle(directive(deployment.key, 2, 2), current=1).action is Action.INSTALL
    assert current(deployment) == 2


def test_the_variant_chosen_for_the_device_class_is_installed(deployment: Deployment) -> None:
    config = SyncConfig(
        model="cnn",
        store_url=deployment.url,
        store_key=deployment.key.public_key_bytes(),
        device_dir=deployment.device_dir,
        cache_dir=deployment.cache_dir,
    )
    device = RolloutAgent(config, device_id="device-7", device_class="cpu-avx2")
    signed = deployment.key.sign_directive(
        ReleaseDirective(
            model="cnn",
            version=2,
            kind=DirectiveKind.ROLLOUT,
            rollout_id="cnn-v2-aaaaaa",
            sequence=1,
            cohort_fraction=1.0,
            previous=1,
            issued_at=time.time(),
            variants={"cpu-avx2": "model-fp32.onnx", "cpu-vnni": "model-int8-static.onnx"},
        )
    )

    device.handle(signed, current=None)

    installed = ModelCache(
        deployment.cache_dir, trusted_key=deployment.key.public_key_bytes()
    ).current("cnn")
    assert installed is not None and installed.artefact == "model-fp32.onnx"


def test_delivered_messages_are_acted_on_and_garbage_is_ignored(deployment: Deployment) -> None:
    device = agent(deployment, [])
    stop = threading.Event()
    worker = threading.Thread(target=device.run, args=(lambda: current(deployment), stop))
    worker.start()
    try:
        device.deliver(b"not json")
        device.deliver(json.dumps({"directive": {}}).encode())
        device.deliver(json.dumps(directive(deployment.key, 1, 2).to_json()).encode())
        deadline = time.monotonic() + 30
        while current(deployment) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        device.close()
        worker.join(10)
    assert current(deployment) == 2


def _broker_answers() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(
    not _broker_answers(),
    reason="needs the Mosquitto broker on 127.0.0.1:1883 (apt-get install mosquitto)",
)
def test_models_follow_acts_on_a_retained_directive_and_reports_over_mqtt(
    deployment: Deployment,
) -> None:
    import os
    import signal
    import subprocess
    import sys

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_runtime.device_events import parse_event

    root = f"fedge-test/{os.getpid()}-{time.monotonic_ns()}"
    received: list[bytes] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda client, userdata, message: received.append(message.payload)
    watcher.connect("127.0.0.1", 1883)
    watcher.subscribe(f"{root}/devices/+/events", qos=1)
    watcher.loop_start()
    topic = f"{root}/models/cnn/directive"
    payload = json.dumps(directive(deployment.key, 1, 2).to_json()).encode()
    watcher.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    follower = subprocess.Popen(
        [
            sys.executable, "-m", "fedge", "client", "models", "follow", "cnn",
            "--store-url", deployment.url, "--store-key", deployment.key.public_key_bytes().hex(),
            "--device-dir", str(deployment.device_dir), "--cache-dir", str(deployment.cache_dir),
            "--broker", "127.0.0.1:1883", "--plaintext", "--topic-root", root,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (current(deployment) != 2 or not received) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        follower.send_signal(signal.SIGTERM)
        _, stderr = follower.communicate(timeout=30)
        watcher.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # clear it
        watcher.loop_stop()
    assert current(deployment) == 2, stderr
    event = parse_event(received[0])
    assert event.kind is EventKind.MODEL_INSTALLED and event.device == "device-7"
    assert event.body["version"] == 2
    assert follower.returncode == 0, stderr
