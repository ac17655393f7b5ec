"""The one valid order of fedge's device mods, checked wherever a ClientApp is built.

:func:`fl_client.composition.device_mods` builds the mods in order; a script that
assembles them by hand in another order used to abort every round with an error
about something else (a DP mod outside the secure one cannot clip what is already
masked, and the secure mod refuses the DP record it does not expect). Each fedge
mod carries its rank, and :func:`check_mod_order` refuses a list out of order with
one message that says the order and where to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from flwr.clientapp.typing import Mod

from fedge.errors import ConfigError

__all__ = ["ModRank", "check_mod_order", "ranked"]

_ATTRIBUTE = "__fedge_mod_rank__"


class ModRank(IntEnum):
    """A fedge mod's place, outermost first."""

    SECURE_AGGREGATION = 10
    BUDGET = 20
    CLIENT_DP = 30
    NORM_BOUND = 40

    @property
    def label(self) -> str:
        """The mod's name in messages."""
        return self.name.lower().replace("_", " ")


def ranked(mod: Mod, rank: ModRank) -> Mod:
    """Mark ``mod`` as the fedge mod of ``rank`` and return it."""
    setattr(mod, _ATTRIBUTE, rank)
    return mod


def check_mod_order(mods: Sequence[Mod]) -> None:
    """Refuse fedge mods out of their one valid order (other mods may sit anywhere).

    Raises
    ------
    ConfigError
        If a fedge mod comes after one that must be inside it, or appears twice.
    """
    seen: list[ModRank] = []
    for mod in mods:
        rank = getattr(mod, _ATTRIBUTE, None)
        if not isinstance(rank, ModRank):
            continue
        if rank in seen:
            raise ConfigError(f"the {rank.label} mod is given twice")
        if seen and rank < seen[-1]:
            order = ", ".join(r.label for r in ModRank)
            raise ConfigError(
                f"fedge's device mods are out of order: the {rank.label} mod comes after the "
                f"{seen[-1].label} mod; the one valid order, outermost first, is {order} "
                "(build them with fl_client.composition.device_mods)"
            )
        seen.append(rank)
