"""A device's DP-SGD noise plan: searched once per run, kept in the device's own Flower Context.

When a DP-SGD round names a target epsilon instead of a noise multiplier, the
device finds sigma with Opacus' noise search (:func:`fl_client.dp_sgd.noise_multiplier_for`):
a bisection over the PRV accountant, 2-3 s on one core. Its answer depends only
on the search's inputs, which stay the same for a device through a run (its
partition fixes the sample rate; the run fixes the target, delta and epochs),
yet every round asks again.

The per-process memo of :func:`~fl_client.dp_sgd.noise_multiplier_for` does not
catch these repeats: Flower's simulation engine serves devices from a pool of
Ray actor processes, so a device lands on another process from round to round,
and devices never share an entry (each partition has its own size, hence its
own sample rate). What follows a device through its rounds is its
:class:`flwr.app.Context`, whose ``state`` the node keeps for the whole run (the
SuperNode in a deployment, the simulation engine's per-node store in a
simulation). The plan is kept there: the search's inputs with its answer, so a
device searches once per run and an entry never answers for other inputs.

Notes
-----
``Context.state`` is the device's own: no server message writes it, and the
plan is never taken from one. A damaged entry (a field missing, of the wrong
type or out of range) is logged and searched again, never used; an entry for
other inputs (another target, delta, sample rate, step count, accountant or
Opacus version) is replaced. The entry is not re-verified against the
accountant: whatever can write a device's Context can already change its code.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Final

import opacus
from flwr.app import ConfigRecord, RecordDict

from fedge.errors import ConfigError
from fl_client.dp_sgd import noise_multiplier_for
from strategies.accounting import AccountantKind, GaussianSteps
from strategies.records import check_noise_multiplier

__all__ = ["NOISE_PLAN_STATE_KEY", "NoiseSearch", "noise_multiplier_in", "recalled_noise"]

logger = logging.getLogger(__name__)

NOISE_PLAN_STATE_KEY: Final = "fedge.dpsgd-noise-plan"
"""The key of the plan's ConfigRecord in ``Context.state``."""

_NOISE = "noise-multiplier"
# The search's implementation is part of its key: another Opacus may answer otherwise.
_SEARCH = "search"
_SEARCH_NAME: Final = f"opacus {opacus.__version__} get_noise_multiplier"


@dataclass(frozen=True, slots=True, kw_only=True)
class NoiseSearch:
    """Everything the noise search depends on, and so the key of its answer.

    Parameters
    ----------
    target_epsilon
        The epsilon the steps may spend at most, > 0.
    delta
        The delta of ``target_epsilon``, in (0, 1).
    sample_rate
        q, the Poisson sample rate, in (0, 1].
    steps
        The steps the target covers (the whole run's, not one round's), >= 1.
    accountant
        The analysis the search runs.
    """

    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: AccountantKind = AccountantKind.PRV

    def __post_init__(self) -> None:
        target = self.target_epsilon
        if isinstance(target, bool) or not (math.isfinite(target) and target > 0):
            raise ConfigError(f"target_epsilon must be a finite number > 0, got {target}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        # Validates sample_rate and steps with GaussianSteps' own messages.
        GaussianSteps(noise_multiplier=1.0, sample_rate=self.sample_rate, steps=self.steps)
        if not isinstance(self.accountant, AccountantKind):
            raise ConfigError(f"accountant must be an AccountantKind, got {self.accountant!r}")

    def fields(self) -> dict[str, float | int | str]:
        """Return the inputs as the fields of the plan's ConfigRecord."""
        return {
            "target-epsilon": float(self.target_epsilon),
            "delta": float(self.delta),
            "sample-rate": float(self.sample_rate),
            "steps": int(self.steps),
            "accountant": self.accountant.value,
            _SEARCH: _SEARCH_NAME,
        }

    def run(self) -> float:
        """Return sigma from the search itself (:func:`fl_client.dp_sgd.noise_multiplier_for`).

        Raises
        ------
        ConfigError
            If no sigma reaches the target.
        """
        return noise_multiplier_for(
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            sample_rate=self.sample_rate,
            steps=self.steps,
            accountant=self.accountant,
        )


def _same_kind(value: object, expected: float | int | str) -> bool:
    # Exact types: a bool is an int to isinstance, and an int is no float the writer wrote.
    return type(value) is type(expected)


def recalled_noise(state: RecordDict, search: NoiseSearch) -> float | None:
    """Return the sigma ``state`` holds for exactly ``search``, or None.

    None when there is no plan, when the plan is for other inputs, and when it is
    damaged (logged as a warning): the caller searches again in each case.
    """
    record = state.config_records.get(NOISE_PLAN_STATE_KEY)
    if record is None:
        return None
    expected = search.fields()
    if set(record) != {*expected, _NOISE}:
        logger.warning("DP-SGD noise plan in the device state has other fields; searching again")
        return None
    for name, value in expected.items():
        if not _same_kind(record[name], value):
            logger.warning(
                "DP-SGD noise plan in the device state: %r is %s, not %s; searching again",
                name,
                type(record[name]).__name__,
                type(value).__name__,
            )
            return None
    noise = record[_NOISE]
    if type(noise) is not float:
        logger.warning("DP-SGD noise plan in the device state: no float sigma; searching again")
        return None
    try:
        check_noise_multiplier(noise)
    except ConfigError as exc:
        logger.warning("DP-SGD noise plan in the device state: %s; searching again", exc)
        return None
    if any(record[name] != value for name, value in expected.items()):
        logger.debug("DP-SGD noise plan in the device state is for other inputs; searching")
        return None
    return noise


def noise_multiplier_in(state: RecordDict, search: NoiseSearch) -> float:
    """Return sigma for ``search``: the plan in the device's ``state``, else searched and kept.

    Parameters
    ----------
    state
        The device's own ``Context.state`` (kept by its node across the rounds of a run).
    search
        The search's inputs.

    Returns
    -------
    float
        The smallest sigma (to Opacus' tolerance) that meets the target.

    Raises
    ------
    ConfigError
        If no sigma reaches the target (nothing is kept then).
    """
    noise = recalled_noise(state, search)
    if noise is not None:
        return noise
    noise = search.run()
    state[NOISE_PLAN_STATE_KEY] = ConfigRecord({**search.fields(), _NOISE: noise})
    return noise
