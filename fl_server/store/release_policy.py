"""The release policy: what a version must be before a protected alias may point at it.

A protected alias (``production`` and ``canary`` by default) is what the fleet
installs, so moving it is a release. :func:`check_release` returns every reason
a move would break the policy; :func:`release` runs it, records a refusal in the
audit trail (``store.release_refused``) and leaves the alias where it was, or
moves it, with a release manager's written override recorded in the
``store.alias_moved`` event when one was given.

The rules, each read from the version's *signed* metadata (never the database's
columns) and from the audit trail's intact records:

- the version is not round 0 (the untrained, random initial weights);
- its run completed (a ``run.completed`` event for its run id); a version with
  no run (published by hand) only when the policy allows manual publishes;
- it is differentially private if the alias's current version is (a non-private
  model never replaces a private one), and if the policy requires DP;
- its epsilon is within ``max_epsilon``, when the policy sets one;
- its accuracy is not below the current version's minus ``max_accuracy_drop``.

The policy lives in ``<fedge home>/release-policy.toml`` (defaults without one)::

    protected_aliases = ["production", "canary"]
    allow_manual_publish = false
    require_dp = true
    max_epsilon = 8.0
    max_accuracy_drop = 0.01

Notes
-----
The check and the move are two steps: an alias moved by someone else in between
is not compared again. The policy guards a release manager's mistakes and the
rollout controller's automation; it is not an access control, since whoever can
write the database can move an alias by hand (the audit trail then shows an
``store.alias_moved`` event without its check, or none at all).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.errors import ConfigError, FedgeError
from fl_server.audit import AuditEventKind
from fl_server.store.records import VersionInfo
from fl_server.store.run_outcomes import RunOutcome, RunOutcomeReader

if TYPE_CHECKING:
    from fl_server.audit import AuditLog
    from fl_server.store.store import ModelStore

__all__ = [
    "POLICY_FILE",
    "Release",
    "ReleasePolicy",
    "ReleaseRefused",
    "check_release",
    "load_release_policy",
    "release",
]

POLICY_FILE = "release-policy.toml"

_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # the store's alias names
# Floating-point slack when accuracies are compared (0.8 - 0.01 is not 0.79 exactly).
_SLACK = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleasePolicy:
    """What a version must be before a protected alias points at it.

    Parameters
    ----------
    protected_aliases
        The aliases the policy guards; any other alias moves unchecked.
    allow_manual_publish
        Allow a version that records no run (published by hand, not by a run):
        neither its completion nor its round can be checked.
    require_dp
        Only differentially private versions (an epsilon, or a DP mode other than off).
    max_epsilon
        The largest epsilon a version may have spent (``None``: no bound). A version
        without a recorded epsilon is refused when this is set.
    max_accuracy_drop
        How far below the alias's current version's accuracy a version may be
        (0: not below it at all).
    """

    protected_aliases: frozenset[str] = field(
        default_factory=lambda: frozenset({"production", "canary"})
    )
    allow_manual_publish: bool = False
    require_dp: bool = False
    max_epsilon: float | None = None
    max_accuracy_drop: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.protected_aliases, frozenset):
            raise ConfigError("protected_aliases must be a frozenset of alias names")
        for alias in sorted(self.protected_aliases):
            if not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or alias == "latest":
                raise ConfigError(
                    f"protected_aliases: {alias!r:.40} is not an alias name (lowercase letters, "
                    "digits, - and _, at most 32, not 'latest')"
                )
        for name in ("allow_manual_publish", "require_dp"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false")
        epsilon = self.max_epsilon
        if epsilon is not None and not (_is_number(epsilon) and math.isfinite(epsilon)):
            raise ConfigError(f"max_epsilon must be a finite number > 0, got {epsilon!r:.40}")
        if epsilon is not None and epsilon <= 0:
            raise ConfigError(f"max_epsilon must be a finite number > 0, got {epsilon!r:.40}")
        drop = self.max_accuracy_drop
        if not (_is_number(drop) and 0 <= drop <= 1):
            raise ConfigError(f"max_accuracy_drop must be a number in [0, 1], got {drop!r:.40}")

    @classmethod
    def from_toml(cls, path: Path) -> ReleasePolicy:
        """Read and validate a policy file (keys as in the module docstring; all optional).

        Raises
        ------
        ConfigError
            If the file cannot be read, is not TOML, or holds an unknown key or a
            bad value; the message names the file and the key.
        """
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the release policy {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the release policy {path} is not valid TOML: {exc}") from None
        allowed = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {allowed}")
        values: dict[str, object] = dict(raw)
        aliases = raw.get("protected_aliases", [])
        if "protected_aliases" in raw:
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise ConfigError(f"{path}: protected_aliases must be a list of alias names")
            values["protected_aliases"] = frozenset(aliases)
        for name in ("max_epsilon", "max_accuracy_drop"):
            if name in raw and _is_number(raw[name]):
                values[name] = float(raw[name])
        try:
            return cls(**values)  # type: ignore[arg-type]  # each value is checked on construction
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_release_policy(home: Path) -> ReleasePolicy:
    """Return the policy in ``home/release-policy.toml``, else the defaults.

    Raises
    ------
    ConfigError
        If the file exists but is not a valid policy.
    """
    path = home / POLICY_FILE
    if not path.exists():
        return ReleasePolicy()
    return ReleasePolicy.from_toml(path)


def check_release(  # noqa: PLR0917 - the signature the rollout controller calls
    store: ModelStore,
    audit: RunOutcomeReader,
    model: str,
    alias: str,
    version: int,
    policy: ReleasePolicy,
) -> list[str]:
    """Return every reason ``alias`` of ``model`` may not point at ``version`` (empty: allowed).

    Parameters
    ----------
    store
        The model store; every version read is verified (signature, index).
    audit
        Says how a run ended: :class:`~fl_server.store.run_outcomes.AuditTrailOutcomes`
        over the database, or :class:`~fl_server.store.run_outcomes.EventOutcomes`
        over events read already.
    model, alias, version
        The move asked for. An alias the policy does not protect is always allowed.
    policy
        The rules.

    Returns
    -------
    list[str]
        One sentence per broken rule, in the order of the module docstring.

    Raises
    ------
    ConfigError
        If the version does not exist.
    StorageError
        If the store or the audit trail cannot be read, or a version's index
        disagrees with its signed manifest (``StoreTampered``).
    """
    if alias not in policy.protected_aliases:
        return []
    where = f"{model} v{version}"
    info = VersionInfo.from_metadata(store.get(model, version).manifest.metadata)
    reasons: list[str] = []
    if info.server_round == 0:
        reasons.append(f"{where} holds round 0: the untrained initial weights")
    reasons += _provenance(info, where, audit, policy)
    private = info.differentially_private
    if policy.require_dp and private is not True:
        reasons.append(f"{where} is {_privacy(info)}; the policy requires DP")
    if policy.max_epsilon is not None:
        if info.dp_epsilon is None:
            reasons.append(
                f"{where} records no epsilon; the policy bounds epsilon at {policy.max_epsilon:g}"
            )
        elif info.dp_epsilon > policy.max_epsilon:
            reasons.append(
                f"{where} spent epsilon {info.dp_epsilon:.3f}, above the policy's "
                f"max_epsilon {policy.max_epsilon:g}"
            )
    current_version = store.aliases(model).get(alias)
    if current_version is not None and current_version != version:
        current = VersionInfo.from_metadata(store.get(model, current_version).manifest.metadata)
        reasons += _against_current(info, current, where, f"{alias} (v{current_version})", policy)
    return reasons


def _provenance(
    info: VersionInfo, where: str, audit: RunOutcomeReader, policy: ReleasePolicy
) -> list[str]:
    """Check the run rule: a completed run's version, or a manual publish the policy allows."""
    if info.run_id is None:
        if policy.allow_manual_publish:
            return []
        return [
            f"{where} records no run (published by hand); the policy allows it only with "
            "allow_manual_publish = true"
        ]
    trail = audit.run_trail(info.run_id)
    reasons = []
    if trail.problem is not None:
        reasons.append(f"the audit trail of run {info.run_id} is damaged ({trail.problem})")
    if trail.outcome is not RunOutcome.COMPLETED:
        reasons.append(
            f"run {info.run_id} of {where} did not complete (the audit trail says "
            f"{trail.outcome.value})"
        )
    return reasons


def _privacy(info: VersionInfo) -> str:
    if info.differentially_private is None:
        return "of unknown DP mode"
    if info.differentially_private:
        mode = "DP" if info.dp_mode is None else f"DP ({info.dp_mode.value})"
        return mode if info.dp_epsilon is None else f"{mode}, epsilon {info.dp_epsilon:.3f}"
    return "not differentially private"


def _against_current(
    info: VersionInfo, current: VersionInfo, where: str, holder: str, policy: ReleasePolicy
) -> list[str]:
    """Check the rules that compare the candidate with the version the alias holds now."""
    reasons = []
    if current.differentially_private and info.differentially_private is not True:
        reasons.append(
            f"{holder} is {_privacy(current)} but {where} is {_privacy(info)}: a non-private "
            "model never replaces a private one"
        )
    if current.accuracy is not None:
        floor = current.accuracy - policy.max_accuracy_drop
        if info.accuracy is None:
            reasons.append(f"{where} records no accuracy; {holder} has {current.accuracy:.4f}")
        elif info.accuracy + _SLACK < floor:
            reasons.append(
                f"{where} has accuracy {info.accuracy:.4f}, below {holder}'s "
                f"{current.accuracy:.4f} - max_accuracy_drop {policy.max_accuracy_drop:g}"
            )
    return reasons


class ReleaseRefused(FedgeError):  # noqa: N818 - reads as what happened
    """The release policy refuses the move; the alias is unchanged.

    Deliberately no builtin base: a refusal is neither a bad value nor an I/O
    failure, and nothing that retries on ``OSError`` should retry it.
    """

    def __init__(self, model: str, alias: str, version: int, reasons: Collection[str]) -> None:
        self.model, self.alias, self.version = model, alias, version
        self.reasons = tuple(reasons)
        super().__init__(
            f"release refused: {model} {alias} -> v{version}: " + "; ".join(self.reasons)
        )


@dataclass(frozen=True, slots=True)
class Release:
    """A move that happened: the version the alias left, and the refusals overridden."""

    previous: int | None
    overridden: tuple[str, ...] = ()


def release(
    store: ModelStore,
    *,
    audit_log: AuditLog,
    outcomes: RunOutcomeReader,
    model: str,
    alias: str,
    version: int,
    policy: ReleasePolicy,
    override: str | None = None,
) -> Release:
    """Point ``alias`` at ``version`` if the policy allows it (or a release manager overrides).

    Parameters
    ----------
    store
        The model store (it records the ``store.alias_moved`` event).
    audit_log
        Where a refusal is recorded (the store's own database).
    outcomes
        How runs ended (see :func:`check_release`).
    model, alias, version
        The move.
    policy
        The rules; an alias it does not protect moves unchecked.
    override
        A release manager's reason to move the alias despite the refusals; recorded
        with them in the ``store.alias_moved`` event. Ignored when nothing is refused.

    Returns
    -------
    Release
        The version the alias left and the refusals that were overridden.

    Raises
    ------
    ReleaseRefused
        If the policy refuses and there is no override: one ``store.release_refused``
        event (model, alias, version, reasons) is recorded and the alias stays.
    ConfigError, StorageError
        As :func:`check_release` and :meth:`ModelStore.tag`.
    """
    reasons = check_release(store, outcomes, model, alias, version, policy)
    if reasons and override is None:
        audit_log.append(
            AuditEventKind.RELEASE_REFUSED,
            {"model": model, "alias": alias, "version": version, "reasons": reasons},
        )
        raise ReleaseRefused(model, alias, version, reasons)
    if not reasons:
        return Release(store.tag(model, alias, version))
    previous = store.tag(model, alias, version, override=override, overridden=reasons)
    return Release(previous, tuple(reasons))
