"""The release policy: each rule allowed and refused, the policy file, and a release's audit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.release_policy import (
    POLICY_FILE,
    ReleasePolicy,
    ReleaseRefused,
    check_release,
    load_release_policy,
    release,
)
from fl_server.store.run_outcomes import AuditTrailOutcomes
from fl_server.store.store import ModelStore, NewArtefact, VersionInfo
from strategies.dp_mode import DpMode

DEFAULT = ReleasePolicy()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    created = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
    try:
        yield created
    finally:
        created.dispose()


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


@pytest.fixture
def store(engine: Engine, audit: AuditLog, tmp_path: Path) -> ModelStore:
    return ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate(), audit=audit)


def _run(audit: AuditLog, run_id: str, *ends: AuditEventKind, status: str = "failed") -> None:
    audit.append(AuditEventKind.RUN_STARTED, {"config": {}}, run_id=run_id)
    for end in ends:
        payload = {"status": status} if end is AuditEventKind.RUN_FAILED else {}
        audit.append(end, payload, run_id=run_id)


def _publish(
    store: ModelStore,
    *,
    run_id: str | None = "run-ok",
    server_round: int | None = 3,
    accuracy: float | None = 0.80,
    epsilon: float | None = None,
    mode: DpMode | None = DpMode.OFF,
) -> int:
    metrics = {} if accuracy is None else {"accuracy": accuracy, "loss": 0.5}
    info = VersionInfo(
        run_id=run_id,
        server_round=server_round,
        dp_mode=mode,
        dp_epsilon=epsilon,
        dp_delta=None if epsilon is None else 1e-5,
        metrics=metrics,
    )
    data = f"{run_id}-{server_round}-{accuracy}-{epsilon}-{mode}".encode()
    version = store.publish("cnn", [NewArtefact(name="weights.npz", data=data)], info=info)
    return version.manifest.version


def _check(
    store: ModelStore,
    engine: Engine,
    version: int,
    policy: ReleasePolicy = DEFAULT,
    alias: str = "production",
) -> list[str]:
    return check_release(store, AuditTrailOutcomes(engine), "cnn", alias, version, policy)


@pytest.fixture
def completed(audit: AuditLog) -> str:
    _run(audit, "run-ok", AuditEventKind.RUN_COMPLETED)
    return "run-ok"


# --- the run rule --------------------------------------------------------------------


def test_a_trained_round_of_a_completed_run_is_allowed(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    assert _check(store, engine, _publish(store, run_id=completed)) == []


@pytest.mark.parametrize(
    ("ends", "status", "said"),
    [
        ((AuditEventKind.RUN_FAILED,), "failed", "failed"),
        ((AuditEventKind.RUN_FAILED,), "interrupted", "interrupted"),
        ((), "", "running"),
        # Resumed after a failure and not finished yet: the last start decides.
        ((AuditEventKind.RUN_FAILED, AuditEventKind.RUN_RESUMED), "failed", "running"),
    ],
)
def test_a_version_of_a_run_that_did_not_complete_is_refused(
    store: ModelStore,
    engine: Engine,
    audit: AuditLog,
    ends: tuple[AuditEventKind, ...],
    status: str,
    said: str,
) -> None:
    _run(audit, "run-x", *ends, status=status)

    reasons = _check(store, engine, _publish(store, run_id="run-x"))

    assert reasons == [f"run run-x of cnn v1 did not complete (the audit trail says {said})"]


def test_a_resumed_run_that_completed_is_allowed(
    store: ModelStore, engine: Engine, audit: AuditLog
) -> None:
    _run(
        audit, "run-r", AuditEventKind.RUN_FAILED, AuditEventKind.RUN_RESUMED,
        AuditEventKind.RUN_COMPLETED,
    )  # fmt: skip

    assert _check(store, engine, _publish(store, run_id="run-r")) == []


def test_a_run_the_trail_does_not_know_is_refused(store: ModelStore, engine: Engine) -> None:
    reasons = _check(store, engine, _publish(store, run_id="run-ghost"))

    assert reasons == ["run run-ghost of cnn v1 did not complete (the audit trail says unknown)"]


def test_a_completion_edited_into_the_database_is_not_evidence(
    store: ModelStore, engine: Engine, audit: AuditLog
) -> None:
    _run(audit, "run-x", AuditEventKind.RUN_FAILED)
    with engine.begin() as connection:  # a failed run relabelled by hand
        connection.exec_driver_sql(
            "UPDATE audit_events SET kind = 'run.completed' WHERE kind = 'run.failed'"
        )

    reasons = _check(store, engine, _publish(store, run_id="run-x"))

    assert len(reasons) == 2
    assert reasons[0].startswith("the audit trail of run run-x is damaged (record 2 is damaged")
    assert reasons[1].endswith("(the audit trail says running)")


def test_a_version_published_by_hand_is_refused_unless_the_policy_allows_it(
    store: ModelStore, engine: Engine
) -> None:
    version = _publish(store, run_id=None, server_round=None)

    assert _check(store, engine, version) == [
        "cnn v1 records no run (published by hand); the policy allows it only with "
        "allow_manual_publish = true"
    ]
    assert _check(store, engine, version, ReleasePolicy(allow_manual_publish=True)) == []


def test_the_untrained_initial_weights_are_refused(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    reasons = _check(store, engine, _publish(store, run_id=completed, server_round=0))

    assert reasons == ["cnn v1 holds round 0: the untrained initial weights"]


def test_an_alias_the_policy_does_not_protect_moves_unchecked(
    store: ModelStore, engine: Engine
) -> None:
    version = _publish(store, run_id="run-ghost", server_round=0)

    assert _check(store, engine, version, alias="staging") == []
    assert _check(store, engine, version, ReleasePolicy(protected_aliases=frozenset())) == []


# --- DP --------------------------------------------------------------------------------


def test_a_non_private_version_never_replaces_a_private_one(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    private = _publish(store, run_id=completed, epsilon=2.0, mode=DpMode.CENTRAL)
    store.tag("cnn", "production", private)
    plain = _publish(store, run_id=completed, accuracy=0.9)

    reasons = _check(store, engine, plain)

    assert reasons == [
        "production (v1) is DP (central), epsilon 2.000 but cnn v2 is not differentially "
        "private: a non-private model never replaces a private one"
    ]


def test_a_private_version_may_replace_a_private_or_a_non_private_one(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    plain = _publish(store, run_id=completed)
    store.tag("cnn", "production", plain)
    private = _publish(store, run_id=completed, epsilon=3.0, mode=DpMode.DISTRIBUTED)
    assert _check(store, engine, private) == []
    store.tag("cnn", "production", private)
    # Sample-level DP: the server records no epsilon, the signed DP mode says private.
    sample = _publish(store, run_id=completed, epsilon=None, mode=DpMode.SAMPLE)
    assert _check(store, engine, sample) == []


def test_a_version_of_unknown_dp_mode_does_not_replace_a_private_one(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    store.tag("cnn", "production", _publish(store, run_id=completed, epsilon=1.0, mode=None))

    [reason] = _check(store, engine, _publish(store, run_id=completed, mode=None))

    assert "cnn v2 is of unknown DP mode: a non-private model never replaces" in reason


def test_require_dp_refuses_a_non_private_version(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    policy = ReleasePolicy(require_dp=True)

    plain = _check(store, engine, _publish(store, run_id=completed), policy)
    private = _check(store, engine, _publish(store, run_id=completed, epsilon=1.0), policy)

    assert plain == ["cnn v1 is not differentially private; the policy requires DP"]
    assert private == []


def test_max_epsilon_bounds_the_epsilon_spent(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    policy = ReleasePolicy(max_epsilon=4.0)
    within = _publish(store, run_id=completed, epsilon=4.0, mode=DpMode.CENTRAL)
    above = _publish(store, run_id=completed, epsilon=4.5, mode=DpMode.CENTRAL)
    without = _publish(store, run_id=completed)

    assert _check(store, engine, within, policy) == []
    assert _check(store, engine, above, policy) == [
        "cnn v2 spent epsilon 4.500, above the policy's max_epsilon 4"
    ]
    assert _check(store, engine, without, policy) == [
        "cnn v3 records no epsilon; the policy bounds epsilon at 4"
    ]


# --- accuracy ------------------------------------------------------------------------


def test_accuracy_below_the_current_version_is_refused(
    store: ModelStore, engine: Engine, completed: str
) -> None:
    store.tag("cnn", "production", _publish(store, run_id=completed, accuracy=0.80))
    worse = _publish(store, run_id=completed, accuracy=0.78)
    equal = _publish(store, run_id=completed, accuracy=0.80)
    unmeasured = _publish(store, run_id=completed, accuracy=None)

    assert _check(store, engine, worse) == [
        "cnn v2 has accuracy 0.7800, below production (v1)'s 0.8000 - max_accuracy_drop 0"
    ]
    assert _check(store, engine, equal) == []
    assert _check(store, engine, worse, ReleasePolicy(max_accuracy_drop=0.02)) == []
    assert _check(store, engine, unmeasured) == [
        "cnn v4 records no accuracy; production (v1) has 0.8000"
    ]


def test_every_broken_rule_is_named(store: ModelStore, engine: Engine, audit: AuditLog) -> None:
    _run(audit, "run-x", AuditEventKind.RUN_FAILED)
    store.tag("cnn", "canary", _publish(store, run_id="run-x", epsilon=1.0, accuracy=0.9))
    version = _publish(store, run_id="run-x", server_round=0, accuracy=0.1)

    reasons = _check(store, engine, version, ReleasePolicy(max_epsilon=2.0), alias="canary")

    phrases = ["holds round 0", "did not complete", "records no epsilon", "never replaces"]
    phrases.append("below canary (v1)'s 0.9000")
    assert len(reasons) == len(phrases)
    assert all(phrase in reason for phrase, reason in zip(phrases, reasons, strict=True))


# --- release(): the refusal and the override in the audit trail -----------------------


def _events(audit: AuditLog, kind: AuditEventKind) -> list[dict[str, object]]:
    return [dict(e.payload) for e in audit.iter() if e.kind is kind]


def test_a_refused_release_is_recorded_and_leaves_the_alias(
    store: ModelStore, engine: Engine, audit: AuditLog, completed: str
) -> None:
    store.tag("cnn", "production", _publish(store, run_id=completed))
    version = _publish(store, run_id=completed, server_round=0)

    with pytest.raises(ReleaseRefused, match=r"release refused: cnn production -> v2: cnn v2 ho"):
        release(
            store, audit_log=audit, outcomes=AuditTrailOutcomes(engine), model="cnn",
            alias="production", version=version, policy=DEFAULT,
        )  # fmt: skip

    assert store.aliases("cnn") == {"production": 1}
    assert _events(audit, AuditEventKind.RELEASE_REFUSED) == [
        {
            "model": "cnn",
            "alias": "production",
            "version": 2,
            "reasons": ["cnn v2 holds round 0: the untrained initial weights"],
        }
    ]


def test_an_override_moves_the_alias_and_records_the_reason_and_the_refusals(
    store: ModelStore, engine: Engine, audit: AuditLog, completed: str
) -> None:
    version = _publish(store, run_id=completed, server_round=0)

    done = release(
        store, audit_log=audit, outcomes=AuditTrailOutcomes(engine), model="cnn",
        alias="production", version=version, policy=DEFAULT, override="  smoke test  ",
    )  # fmt: skip

    assert done.previous is None
    assert done.overridden == ("cnn v1 holds round 0: the untrained initial weights",)
    assert store.aliases("cnn") == {"production": 1}
    [moved] = _events(audit, AuditEventKind.ALIAS_MOVED)
    assert moved["override"] == "smoke test"
    assert moved["overridden"] == list(done.overridden)
    assert _events(audit, AuditEventKind.RELEASE_REFUSED) == []


def test_an_allowed_release_records_no_override(
    store: ModelStore, engine: Engine, audit: AuditLog, completed: str
) -> None:
    done = release(
        store, audit_log=audit, outcomes=AuditTrailOutcomes(engine), model="cnn",
        alias="production", version=_publish(store, run_id=completed), policy=DEFAULT,
        override="not needed",
    )  # fmt: skip

    assert done.overridden == ()
    [moved] = _events(audit, AuditEventKind.ALIAS_MOVED)
    assert "override" not in moved


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"override": "   "}, "an override needs a reason of 1 to 1,000 characters"),
        ({"override": "x" * 1001}, "an override needs a reason of 1 to 1,000 characters"),
        ({"overridden": ["r"]}, r"refusals can only be overridden with a reason"),
    ],
)
def test_tag_refuses_an_override_without_a_reason(
    store: ModelStore, kwargs: dict[str, object], match: str
) -> None:
    version = _publish(store)

    with pytest.raises(ConfigError, match=match):
        store.tag("cnn", "production", version, **kwargs)  # type: ignore[arg-type]

    assert store.aliases("cnn") == {}


# --- the policy and its file -----------------------------------------------------------


def test_the_defaults_protect_production_and_canary() -> None:
    assert DEFAULT.protected_aliases == frozenset({"production", "canary"})
    assert (DEFAULT.allow_manual_publish, DEFAULT.require_dp) == (False, False)
    assert (DEFAULT.max_epsilon, DEFAULT.max_accuracy_drop) == (None, 0.0)


def test_without_a_file_the_defaults_apply(tmp_path: Path) -> None:
    assert load_release_policy(tmp_path) == DEFAULT


def test_a_policy_file_is_read(tmp_path: Path) -> None:
    (tmp_path / POLICY_FILE).write_text(
        'protected_aliases = ["production"]\nallow_manual_publish = true\n'
        "require_dp = true\nmax_epsilon = 8\nmax_accuracy_drop = 0.01\n"
    )

    policy = load_release_policy(tmp_path)

    assert policy == ReleasePolicy(
        protected_aliases=frozenset({"production"}),
        allow_manual_publish=True,
        require_dp=True,
        max_epsilon=8.0,
        max_accuracy_drop=0.01,
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max_epsilon = [", r"release-policy.toml is not valid TOML"),
        ("max_epsilon_x = 1", r"release-policy.toml: unknown keys \['max_epsilon_x'\]; allowed"),
        ("max_epsilon = 0", r"release-policy.toml: max_epsilon must be a finite number > 0"),
        ("max_epsilon = nan", r"max_epsilon must be a finite number > 0, got nan"),
        ('max_epsilon = "none"', r"max_epsilon must be a finite number > 0, got 'none'"),
        ("max_epsilon = true", r"max_epsilon must be a finite number > 0, got True"),
        ("max_accuracy_drop = -0.1", r"max_accuracy_drop must be a number in \[0, 1\]"),
        ("max_accuracy_drop = 2", r"max_accuracy_drop must be a number in \[0, 1\], got 2.0"),
        ('require_dp = "yes"', r"release-policy.toml: require_dp must be true or false"),
        ("allow_manual_publish = 1", r"allow_manual_publish must be true or false"),
        ('protected_aliases = "production"', r"protected_aliases must be a list of alias"),
        ("protected_aliases = [1]", r"protected_aliases must be a list of alias names"),
        ('protected_aliases = ["Prod"]', r"protected_aliases: 'Prod' is not an alias name"),
        ('protected_aliases = ["latest"]', r"protected_aliases: 'latest' is not an alias"),
    ],
)
def test_a_bad_policy_file_is_one_error_naming_the_key(
    tmp_path: Path, text: str, match: str
) -> None:
    (tmp_path / POLICY_FILE).write_text(text + "\n")

    with pytest.raises(ConfigError, match=match):
        load_release_policy(tmp_path)


def test_an_unreadable_policy_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / POLICY_FILE).mkdir()

    with pytest.raises(ConfigError, match=r"cannot read the release policy .*release-policy"):
        load_release_policy(tmp_path)


def test_protected_aliases_must_be_a_frozenset() -> None:
    with pytest.raises(ConfigError, match="protected_aliases must be a frozenset"):
        ReleasePolicy(protected_aliases={"production"})  # type: ignore[arg-type]
