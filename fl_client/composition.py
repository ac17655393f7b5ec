"""The device's Flower mods in their one valid order.

Secure aggregation outermost: it strips its own record, hands the plain train
message on, and masks the reply it gets back. Then the device's own budget:
it sees every DP record the server sent (including the distributed-DP record
the secure mod checked) and declines a round past the device's lifetime
epsilon before any training. Then client-level DP, innermost next to the
train handler: it clips (central) or clips and noises (local) the update
before the secure mod masks it. Any other order either leaks (DP after
masking cannot clip), double-charges, or aborts every round with a misleading
error; simulations and deployments both build their mods here.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.clientapp.typing import Mod

from fl_client.budget import ClientBudget, make_budget_mod
from fl_client.dp_mod import make_dp_mod
from fl_client.norm_bound_mod import make_norm_bound_mod
from fl_client.policy import DevicePolicy
from fl_client.refusals import RefusalRecorder, ignore_refusal
from fl_client.revocations import RevocationProvider, nothing_revoked
from fl_client.secagg_mod import IdentityProvider, make_secagg_mod
from secure_agg.randomness import RandomSource, SystemRandomSource

__all__ = ["device_mods"]


def device_mods(
    policy: DevicePolicy,
    *,
    secure: bool,
    identities: IdentityProvider | None = None,
    budget: ClientBudget | None = None,
    client_dp: bool = True,
    on_refusal: RefusalRecorder = ignore_refusal,
    rng_factory: Callable[[], RandomSource] = SystemRandomSource,
    revocations: RevocationProvider = nothing_revoked,
    max_update_l2: float | None = None,
) -> tuple[Mod, ...]:
    """Return the device's mods, outermost first, for ``ClientApp(mods=...)``.

    Parameters
    ----------
    policy
        The device's own policy; every mod checks the server's requests against it.
    secure
        Take part in fedge SecAgg+ rounds (with distributed DP inside them).
    identities
        The device's enrolled identity (active threat model); ``None``: none.
    budget
        The device's lifetime ledger; ``None``: no device-side budget.
    client_dp
        Serve central-DP clipping and local DP (both pass plain rounds through).
    on_refusal
        Where every refused round is recorded.
    rng_factory
        The CSPRNG for masks and noise (tests inject seeded ones).
    revocations
        The device's own verified revocation list (active threat model): a
        neighbour on it is refused like one with a forged certificate.
    max_update_l2
        Bound the L2 norm of every update the device sends
        (:func:`fl_client.norm_bound_mod.make_norm_bound_mod`), innermost, right
        above the training it guards: the defence against poisoned training that
        holds under secure aggregation. ``None``: no bound.
    """
    mods: list[Mod] = []
    if secure:
        mods.append(
            make_secagg_mod(
                policy=policy,
                on_refusal=on_refusal,
                rng_factory=rng_factory,
                revocations=revocations,
            )
            if identities is None
            else make_secagg_mod(
                policy=policy,
                identities=identities,
                on_refusal=on_refusal,
                rng_factory=rng_factory,
                revocations=revocations,
            )
        )
    if budget is not None:
        mods.append(make_budget_mod(budget, policy=policy, on_refusal=on_refusal))
    if client_dp:
        mods.append(make_dp_mod(policy=policy, rng_factory=rng_factory, on_refusal=on_refusal))
    if max_update_l2 is not None:
        mods.append(make_norm_bound_mod(max_update_l2))
    return tuple(mods)
