"""Norm bounding of model updates: the defence against boosted and scaled updates.

A Byzantine client that scales its update by a large factor (model replacement,
Bagdasaryan et al. 2020) dominates a mean. Bounding every update's L2 norm caps
what one client can move the aggregate by; Sun et al. (2019, "Can you really
backdoor federated learning?") show that a bound near the honest updates' norms
defeats most backdoors at little cost in accuracy. Where the bound comes from
(a fixed constant, or a multiple of the round's median norm) is the caller's
choice; :func:`median_norm_bound` computes the second.

Pure numpy: the device mod (:mod:`fl_client.norm_bound_mod`) and the server
wrapper (:mod:`fl_server.norm_bounding`) both call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from strategies.clipping import clip_l2

__all__ = ["bound_update", "median_norm_bound", "update_norm"]


def update_norm(update: npt.NDArray[np.floating]) -> float:
    """Return the L2 norm of ``update`` over all its values (computed in float64).

    Raises
    ------
    ConfigError
        If the update holds NaN or infinity.
    """
    norm = float(np.linalg.norm(np.asarray(update, dtype=np.float64).reshape(-1)))
    if not math.isfinite(norm):
        raise ConfigError("the update holds NaN or infinite values")
    return norm


def bound_update(
    update: npt.NDArray[np.floating], max_norm: float
) -> tuple[npt.NDArray[np.float64], bool]:
    """Scale ``update`` down so its L2 norm is at most ``max_norm``; keep a shorter one as is.

    Parameters
    ----------
    update
        A model update (any shape); it is not modified.
    max_norm
        The bound, finite and >= 0; 0 turns every update into the zero update.

    Returns
    -------
    tuple[numpy.ndarray, bool]
        The bounded update (float64, ``update``'s shape) and whether it was scaled
        down. The direction is kept; a norm is never increased; the zero update
        is accepted (nothing divides by its norm); bounding twice changes nothing.

    Raises
    ------
    ConfigError
        If ``max_norm`` is negative, NaN or infinite, or the update holds NaN or
        infinity (or values so large that its norm overflows float64): such an
        update is refused, never bounded.
    """
    if isinstance(max_norm, bool) or not (math.isfinite(max_norm) and max_norm >= 0):
        raise ConfigError(f"max_norm must be a finite number >= 0, got {max_norm}")
    values = np.asarray(update, dtype=np.float64)
    if max_norm == 0:
        update_norm(values)  # refuses NaN and infinity
        # Any non-zero value counts, even one whose squared norm underflows to 0.
        return np.zeros_like(values), bool(np.any(values))
    result = clip_l2(values, max_norm)  # raises on NaN/inf, clamps rounding past the bound
    return result.update.reshape(values.shape), result.clipped


def median_norm_bound(norms: Sequence[float], factor: float) -> float:
    """Return ``factor`` times the median of ``norms``: an adaptive bound for one round.

    The median stays within the honest clients' norms as long as fewer than half
    the clients are Byzantine, so scaling a few updates up cannot raise the bound.

    Parameters
    ----------
    norms
        The L2 norms of the round's updates (at least one, each finite and >= 0).
    factor
        How far above the median an update may reach, finite and > 0 (e.g. 1.5).

    Raises
    ------
    ConfigError
        If there are no norms, one is negative or not finite, or ``factor`` is not > 0.
    """
    if isinstance(factor, bool) or not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"the median factor must be a finite number > 0, got {factor}")
    if len(norms) == 0:
        raise ConfigError("a median bound needs at least one norm")
    values = np.asarray(norms, dtype=np.float64)
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        raise ConfigError("norms must be finite numbers >= 0")
    return factor * float(np.median(values))
