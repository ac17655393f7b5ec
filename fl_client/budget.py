"""The device's own lifetime privacy ledger, and a mod that declines rounds past its budget.

The server's ledger (``fl_server.ledger``) guards the run; a device must not
depend on it for its own guarantee. Each device keeps one append-only file of
every round it contributed to, in every run of its life (one JSON line per
round, fsynced before the update leaves the device; the file lives in the
device's own directory, never in a run's), and declines a round whose spend
would take it past its own lifetime epsilon budget: the decline is an ordinary
error reply, so the round continues without it.

What a round costs the device, from what the round asks of it and the
device's own policy (never from what the server claims it will do):

- central DP (``fedge.cdp``): the Gaussian mechanism of multiplier z on the
  rounds it takes part in, no amplification (the device knows it was sampled);
- local DP (``fedge.ldp``): the Gaussian mechanism of multiplier z / 2;
- distributed DP (``fedge.ddp``): rho of the distributed discrete Gaussian
  with only the noise of the policy's fewest honest contributors
  (:meth:`fl_client.policy.DevicePolicy.distributed_rho`) — the worst case the
  device allows, since it refuses to unmask for fewer;
- shared-noise DP-SGD (``fedge.sddp``): one subsampled Gaussian step at the
  round's (the device's own) example sample rate and the multiplier the noise of
  the policy's fewest honest devices gives
  (:meth:`fl_client.policy.DevicePolicy.sample_distributed_multiplier`);
- sample-level DP-SGD: the device's own Opacus accounting (recorded by the train handler).

A torn last line (a crash while appending) is dropped: the reply of that round
was never sent. Any other damage stops the device from training (fail closed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from edge_runtime.durable import append_synced
from fedge.errors import ConfigError, FedgeError, StorageError
from fl_client.mod_order import ModRank, ranked
from fl_client.policy import DevicePolicy
from secure_agg.errors import PolicyViolation
from strategies.accounting import AccountantKind, GaussianSteps, PrivacySpend, spent_epsilon
from strategies.central import CDP_RECORD_KEY, LDP_RECORD_KEY, CentralDpRound, LocalDpSettings
from strategies.ddp import DDP_RECORD_KEY, DdpConfig
from strategies.sample_ddp import SDDP_RECORD_KEY, SampleDdpConfig

if TYPE_CHECKING:  # the refusal log names devices with this module's device_name
    from fl_client.refusals import RefusalRecorder

__all__ = [
    "BUDGET_ERROR_CODE",
    "ClientBudget",
    "ClientBudgetExhausted",
    "ClientLedger",
    "ClientSpend",
    "declined",
    "device_name",
    "make_budget_mod",
    "round_spend",
]

logger = logging.getLogger(__name__)

BUDGET_ERROR_CODE: Final = 4312


class ClientBudgetExhausted(FedgeError):  # noqa: N818 - reads as what happened
    """The round would take this device past its own privacy budget."""


# What one round costs the device (the same record the server's ledger keeps).
ClientSpend = PrivacySpend


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientBudget:
    """A device's budget and where its ledger lives.

    Parameters
    ----------
    directory
        Where the ledgers are kept (one file per device).
    epsilon
        The device's epsilon budget, > 0.
    delta
        The delta epsilon is computed at, in (0, 1).
    accountant
        How Gaussian-only spending is accounted (PRV for DP-SGD devices).
    """

    directory: Path
    epsilon: float
    delta: float = 1e-5
    accountant: AccountantKind = AccountantKind.RDP

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"the client epsilon budget must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")

    @classmethod
    def for_policy(
        cls,
        policy: DevicePolicy,
        directory: Path,
        *,
        accountant: AccountantKind = AccountantKind.RDP,
    ) -> ClientBudget:
        """Return the lifetime budget a device policy sets, with its ledgers in ``directory``.

        Raises
        ------
        ConfigError
            If the policy sets no lifetime budget.
        """
        if policy.lifetime_epsilon is None:
            raise ConfigError("the device policy sets no lifetime epsilon budget")
        return cls(
            directory=directory,
            epsilon=policy.lifetime_epsilon,
            delta=policy.delta,
            accountant=accountant,
        )

    def ledger_for(self, context: Context) -> ClientLedger:
        """Return the lifetime ledger of the device running ``context`` (:func:`device_name`)."""
        return ClientLedger(self.directory / f"device-{device_name(context)}.jsonl")

    def check(self, ledger: ClientLedger, spend: ClientSpend) -> float:
        """Return the epsilon the round would bring the device to.

        Raises
        ------
        ClientBudgetExhausted
            If that exceeds the budget.
        """
        projected = ledger.epsilon(self.delta, extra=spend, kind=self.accountant)
        if projected > self.epsilon:
            raise ClientBudgetExhausted(
                f"this round would take the device to epsilon {projected:.4g} > its budget "
                f"{self.epsilon:g} (delta {self.delta:g}); declining"
            )
        return projected


class ClientLedger:
    """An append-only JSON-lines ledger of one device's spending."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        """Return the recorded rounds, oldest first.

        Raises
        ------
        StorageError
            If the file is damaged anywhere but a torn last line.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read the device ledger {self.path}: {exc}") from exc
        lines = raw.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        if torn:
            logger.warning("device ledger %s: dropping a torn last line", self.path)
        out = []
        for number, line in enumerate(complete, start=1):
            try:
                entry = json.loads(line)
                ClientSpend.from_json(entry)
            except (ValueError, KeyError, TypeError, ConfigError) as exc:
                raise StorageError(
                    f"device ledger {self.path} line {number} is damaged: {exc}"
                ) from exc
            out.append(entry)
        return out

    def epsilon(
        self,
        delta: float,
        *,
        extra: ClientSpend | None = None,
        kind: AccountantKind = AccountantKind.RDP,
    ) -> float:
        """Return epsilon(delta) of every recorded round (plus ``extra``)."""
        spends = [ClientSpend.from_json(e) for e in self.entries()]
        if extra is not None:
            spends.append(extra)
        return spent_epsilon(spends, delta=delta, kind=kind)

    def record(self, server_round: int, spend: ClientSpend) -> None:
        """Append the round's spend and fsync it.

        Raises
        ------
        StorageError
            If the file cannot be written.
        """
        line = {
            "round": server_round,
            "recorded_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            **spend.to_json(),
        }
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_torn_tail()
            append_synced(self.path, data)
        except OSError as exc:
            raise StorageError(f"cannot write the device ledger {self.path}: {exc}") from exc

    def _drop_torn_tail(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                keep = raw.rfind(b"\n") + 1
                with open(self.path, "r+b") as handle:
                    handle.truncate(keep)
                    handle.flush()
                    os.fsync(handle.fileno())


def device_name(context: Context) -> str:
    """Return the stable name of the device running ``context``.

    Its ``device-id``, else its ``partition-id`` (simulations), else the node id.

    Raises
    ------
    ConfigError
        If the name cannot name a file.
    """
    config = context.node_config
    device = config.get("device-id", config.get("partition-id", context.node_id))
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise ConfigError("the node config's device-id or partition-id must be an integer or text")
    name = str(device)
    if not (0 < len(name) <= 128 and name.replace("-", "").replace("_", "").isalnum()):
        raise ConfigError(f"unusable device name {name!r} for a ledger file")
    return name


def _participation(mechanism: str, noise_multiplier: float) -> ClientSpend:
    # One unamplified Gaussian step: the device knows it took part.
    event = GaussianSteps(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
    return ClientSpend(mechanism=mechanism, gaussian=event)


def round_spend(content: RecordDict, policy: DevicePolicy) -> ClientSpend | None:
    """Return what the round in ``content`` costs the device (None: no DP mechanism asked).

    Raises
    ------
    ConfigError
        If a DP record is malformed.
    PolicyViolation
        If a DP record is outside the device's policy.
    """
    records = content.config_records
    if CDP_RECORD_KEY in records:
        central = CentralDpRound.from_fields(records[CDP_RECORD_KEY])
        policy.check_central(central)
        return _participation("central-gaussian", central.noise_multiplier)
    if LDP_RECORD_KEY in records:
        local = LocalDpSettings.from_fields(records[LDP_RECORD_KEY])
        policy.check_local(local)
        return _participation("local-gaussian", local.accounted_noise_multiplier)
    if DDP_RECORD_KEY in records:
        ddp = DdpConfig.from_fields(records[DDP_RECORD_KEY])
        policy.check_distributed(ddp)
        return ClientSpend(mechanism="distributed-ddg", rho=policy.distributed_rho(ddp))
    if SDDP_RECORD_KEY in records:
        sddp = SampleDdpConfig.from_fields(records[SDDP_RECORD_KEY])
        # The check computes the same multiplier (and refuses what the analysis cannot hold).
        policy.check_sample_distributed(sddp)
        return sddp.spend(policy.min_honest_contributors)
    return None


def _round_of(content: RecordDict) -> int:
    for record in content.config_records.values():
        value = record.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def declined(msg: Message, reason: Exception) -> Message:
    """Return the error reply of a device that declines ``msg`` for its budget."""
    return Message(
        Error(code=BUDGET_ERROR_CODE, reason=f"client privacy budget: {reason}"), reply_to=msg
    )


def make_budget_mod(
    budget: ClientBudget, *, policy: DevicePolicy, on_refusal: RefusalRecorder | None = None
) -> Mod:
    """Return a mod that declines rounds past the device's budget and records the others.

    ``policy`` bounds every DP parameter and fixes how distributed DP is charged;
    ``on_refusal`` is told why a round was declined.

    Place it inside the secure-aggregation mod (it must see the train message
    with its DP records) and outside the DP mod: ``[secagg, budget, dp]``.
    """

    def budget_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        try:
            spend = round_spend(msg.content, policy)
            if spend is None:
                return call_next(msg, context)
            ledger = budget.ledger_for(context)
            budget.check(ledger, spend)
        except (ConfigError, PolicyViolation, StorageError, ClientBudgetExhausted) as exc:
            logger.warning("privacy budget: declining the round: %s", exc)
            if on_refusal is not None:
                on_refusal(context, "privacy budget", str(exc))
            return declined(msg, exc)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            # Before the update leaves the device: a crash here loses the reply, not the record.
            ledger.record(_round_of(msg.content), spend)
        except StorageError as exc:
            logger.error("privacy budget: cannot record the round, not sending it: %s", exc)
            return declined(msg, exc)
        return reply

    return ranked(budget_mod, ModRank.BUDGET)
