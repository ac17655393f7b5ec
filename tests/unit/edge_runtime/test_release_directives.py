"""Signed release directives and the device's guard: what a hostile server cannot make it do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.directive_guard import Action, DirectiveGuard, DirectiveRefused
from edge_runtime.release import (
    DirectiveKind,
    ReleaseDirective,
    SignedDirective,
    cohort_bucket,
    in_cohort,
)
from fedge.errors import ConfigError
from fl_server.store.keys import StoreKey

KEY = StoreKey.generate()


def directive(**changes: object) -> ReleaseDirective:
    fields: dict[str, object] = {
        "model": "cnn",
        "version": 5,
        "kind": DirectiveKind.ROLLOUT,
        "rollout_id": "cnn-v5-abc123",
        "sequence": 3,
        "cohort_fraction": 1.0,
        "previous": 4,
        "issued_at": 1_700_000_000.0,
    }
    fields.update(changes)
    return ReleaseDirective(**fields)  # type: ignore[arg-type]


def guard(tmp_path: Path, device: str = "dev-0001", *, opted_out: bool = False) -> DirectiveGuard:
    return DirectiveGuard(
        tmp_path, device_id=device, store_public_key=KEY.public_key_bytes(), opted_out=opted_out
    )


def test_a_signed_directive_round_trips_and_verifies(tmp_path: Path) -> None:
    signed = KEY.sign_directive(directive())
    parsed = SignedDirective.from_json(json.loads(json.dumps(signed.to_json())))

    decision = guard(tmp_path).decide(parsed, model="cnn", current=4)

    assert (decision.action, decision.version, decision.sequence) == (Action.INSTALL, 5, 3)


def test_a_forged_or_foreign_directive_changes_nothing(tmp_path: Path) -> None:
    genuine = KEY.sign_directive(directive())
    forged = SignedDirective(directive(version=6), genuine.signature, genuine.key_id)
    foreign = StoreKey.generate().sign_directive(directive())

    with pytest.raises(DirectiveRefused, match="signature does not verify"):
        guard(tmp_path).decide(forged, model="cnn", current=4)
    with pytest.raises(DirectiveRefused, match="signed by key"):
        guard(tmp_path).decide(foreign, model="cnn", current=4)
    with pytest.raises(DirectiveRefused, match="for cnn, not other"):
        guard(tmp_path).decide(genuine, model="other", current=4)
    assert not (tmp_path / "directives.json").exists()


def test_a_replayed_directive_is_refused_once_a_newer_one_was_acted_on(tmp_path: Path) -> None:
    device = guard(tmp_path)
    old = KEY.sign_directive(directive(sequence=3))
    newer = KEY.sign_directive(
        directive(sequence=4, kind=DirectiveKind.ROLLBACK, version=4, previous=4)
    )
    device.acted("cnn", device.decide(old, model="cnn", current=4))
    rollback = device.decide(newer, model="cnn", current=5)
    assert (rollback.action, rollback.version) == (Action.ROLLBACK, 4)
    device.acted("cnn", rollback)

    # The server (or a cache) replays the withdrawn rollout: refused, after a restart too.
    with pytest.raises(DirectiveRefused, match="not newer than 4"):
        guard(tmp_path).decide(old, model="cnn", current=4)
    assert guard(tmp_path).last_sequence("cnn") == 4


def test_a_rollout_never_moves_a_device_back(tmp_path: Path) -> None:
    older = KEY.sign_directive(directive(version=3, previous=2))
    with pytest.raises(DirectiveRefused, match="never moves a device back"):
        guard(tmp_path).decide(older, model="cnn", current=4)


def test_only_a_signed_rollback_moves_back_and_only_to_the_version_it_names(
    tmp_path: Path,
) -> None:
    rollback = KEY.sign_directive(
        directive(kind=DirectiveKind.ROLLBACK, version=4, previous=4, sequence=9)
    )
    decision = guard(tmp_path).decide(rollback, model="cnn", current=5)
    assert (decision.action, decision.version) == (Action.ROLLBACK, 4)
    assert guard(tmp_path).decide(rollback, model="cnn", current=4).action is Action.STAY
    with pytest.raises(ConfigError, match="version == previous"):
        directive(kind=DirectiveKind.ROLLBACK, version=2, previous=4)
    with pytest.raises(ConfigError, match="cohort_fraction 1"):
        directive(kind=DirectiveKind.ROLLBACK, version=4, previous=4, cohort_fraction=0.5)


def test_a_device_outside_the_cohort_or_opted_out_stays(tmp_path: Path) -> None:
    rollout = "cnn-v5-abc123"
    inside = next(f"dev-{i}" for i in range(1000) if in_cohort(f"dev-{i}", rollout, 0.1))
    outside = next(f"dev-{i}" for i in range(1000) if not in_cohort(f"dev-{i}", rollout, 0.1))
    canary = KEY.sign_directive(directive(cohort_fraction=0.1))

    assert guard(tmp_path, inside).decide(canary, model="cnn", current=4).action is Action.INSTALL
    assert guard(tmp_path, outside).decide(canary, model="cnn", current=4).action is Action.STAY
    opted = guard(tmp_path, inside, opted_out=True)
    assert opted.decide(canary, model="cnn", current=4).action is Action.STAY
    fleet_wide = KEY.sign_directive(directive(sequence=4))
    assert opted.decide(fleet_wide, model="cnn", current=4).action is Action.INSTALL


@given(
    device=st.from_regex(r"[A-Za-z0-9_.:\-]{1,40}", fullmatch=True),
    fractions=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=5),
)
def test_cohorts_are_sticky_and_nested(device: str, fractions: list[float]) -> None:
    fractions.sort()
    member = [in_cohort(device, "r1", f) for f in fractions]
    # Once in a stage's cohort, a device is in every later (larger) stage's.
    assert member == sorted(member)
    assert cohort_bucket(device, "r1") == cohort_bucket(device, "r1")


def test_cohort_buckets_are_uniform_and_independent_between_rollouts() -> None:
    devices = [f"dev-{i:05d}" for i in range(10_000)]
    share = sum(in_cohort(d, "r1", 0.1) for d in devices) / len(devices)
    overlap = sum(in_cohort(d, "r1", 0.1) and in_cohort(d, "r2", 0.1) for d in devices)
    assert 0.09 < share < 0.11
    assert overlap < 200  # about 1 % (100), not the same devices as canaries every time


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "../x"}, "directive model"),
        ({"version": 0}, "version must be an int >= 1"),
        ({"sequence": True}, "sequence must be an int"),
        ({"rollout_id": "Bad_ID"}, "rollout_id must match"),
        ({"cohort_fraction": 0.0}, r"cohort_fraction must be in \(0, 1\]"),
        ({"cohort_fraction": float("nan")}, "cohort_fraction"),
        ({"previous": 0}, "previous must be an int"),
        ({"issued_at": -1.0}, "issued_at"),
        ({"kind": "rollout"}, "kind must be a DirectiveKind"),
    ],
)
def test_every_field_is_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        directive(**changes)


def test_the_parser_refuses_unknown_keys_and_bad_signatures() -> None:
    document = KEY.sign_directive(directive()).to_json()
    with pytest.raises(ConfigError, match="exactly the keys"):
        SignedDirective.from_json({**document, "extra": 1})
    with pytest.raises(ConfigError, match="exactly the keys"):
        SignedDirective.from_json({**document, "directive": {**document["directive"], "x": 1}})
    with pytest.raises(ConfigError, match="base64"):
        SignedDirective.from_json({**document, "signature": "!!"})
    with pytest.raises(ConfigError, match="rollout or rollback"):
        ReleaseDirective.from_json({**document["directive"], "kind": "downgrade"})


def test_a_device_takes_the_variant_chosen_for_its_class(tmp_path: Path) -> None:
    signed = KEY.sign_directive(
        directive(variants={"cpu-avx2": "model-fp32.onnx", "cpu-vnni": "model-int8.onnx"})
    )
    avx2 = DirectiveGuard(
        tmp_path, device_id="d1", store_public_key=KEY.public_key_bytes(), device_class="cpu-avx2"
    )
    unknown = DirectiveGuard(
        tmp_path, device_id="d2", store_public_key=KEY.public_key_bytes(), device_class="cuda"
    )
    assert avx2.decide(signed, model="cnn", current=4).artefact == "model-fp32.onnx"
    assert unknown.decide(signed, model="cnn", current=4).artefact is None
    # The choice is inside the signature: editing it breaks the directive.
    edited = SignedDirective(
        directive(variants={"cpu-avx2": "model-int4.onnx"}), signed.signature, signed.key_id
    )
    with pytest.raises(DirectiveRefused, match="signature"):
        avx2.decide(edited, model="cnn", current=4)


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ({"CPU": "m.onnx"}, "bad device class"),
        ({"cpu": "../m.onnx"}, "bad artefact name"),
        ({f"c{i}": "m.onnx" for i in range(33)}, "at most 32"),
    ],
)
def test_variant_maps_are_validated(variants: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        directive(variants=variants)
