"""L2 clipping of a client's update: the sensitivity bound every DP mechanism starts from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError

__all__ = ["ClipResult", "clip_l2"]


@dataclass(frozen=True, slots=True)
class ClipResult:
    """The clipped update, its norm before clipping, and whether it was scaled down."""

    update: npt.NDArray[np.float64]
    norm: float
    clipped: bool


def clip_l2(update: npt.NDArray[np.floating], bound: float, *, copy: bool = True) -> ClipResult:
    """Scale ``update`` so its L2 norm is at most ``bound``; a shorter update is kept as is.

    Never increases a norm and accepts the zero update (no division by a zero
    norm, unlike Flower's DP wrappers). With ``copy=False`` a float64 update that
    is already short enough is returned itself (one pass over the vector fewer,
    for a caller that only reads it).

    Raises
    ------
    ConfigError
        If ``bound`` is not a finite number > 0 or the update holds NaN or infinity.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ConfigError(f"the clipping bound must be a finite number > 0, got {bound}")
    flat = np.asarray(update, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm):
        raise ConfigError("cannot clip an update holding NaN or infinite values")
    if norm <= bound:
        return ClipResult(update=flat.copy() if copy else flat, norm=norm, clipped=False)
    # bound / norm < 1 here; the product's rounding (and the norm's own) can exceed
    # the bound by an ulp or two, so shrink by one ulp of the factor until it holds
    # (a clipped update must clip to itself: clipping twice changes nothing).
    scaled = flat * (bound / norm)
    while (excess := float(np.linalg.norm(scaled))) > bound:
        scaled *= np.nextafter(bound / excess, 0.0)
    return ClipResult(update=scaled, norm=norm, clipped=True)
