"""The fedge ClientApp: load the global model, train on local data, send the update."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from edge_runtime.model_spec import ModelSpec
from edge_runtime.models import InputEncoding, ModelName
from fedge.errors import ConfigError
from fl_client.budget import ClientBudget, ClientBudgetExhausted, ClientSpend, declined
from fl_client.device import DeviceKind, select_device
from fl_client.dp_mod import inside_secure_round
from fl_client.grad_sum import GRADIENT_SUM_KEY, clipped_gradient_sum, gradient_sum_record
from fl_client.messages import ARRAYS_KEY, METRICS_KEY, decode_train_instruction
from fl_client.mod_order import check_mod_order
from fl_client.policy import DevicePolicy
from fl_client.training import TrainConfig, TrainResult, train
from secure_agg.errors import PolicyViolation
from secure_agg.randomness import SystemRandomSource
from strategies.accounting import GaussianSteps
from strategies.sample_ddp import SDDP_RECORD_KEY, SampleDdpConfig
from strategies.sample_dp import DPSGD_RECORD_KEY, SampleDpSettings

if TYPE_CHECKING:
    from torch import nn

    from fl_client.dp_sgd import DpSgdConfig

__all__ = ["PARTITION_ID_METRIC", "PARTITION_QUERY", "PartitionProvider", "make_client_app"]

logger = logging.getLogger(__name__)

_PARTITION_ID = "partition-id"
PARTITION_QUERY = "partition"
"""The action of the simulation-only query a node answers with its partition id."""
PARTITION_ID_METRIC = "partition-id"
_NUM_PARTITIONS = "num-partitions"


class PartitionProvider(Protocol):
    """Return one client's local examples (uint8 images, integer labels).

    Implementations must be picklable: the simulation engine ships them to its
    worker processes, which call them once per training request.
    """

    def __call__(
        self, partition_id: int, num_partitions: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.integer]]:
        """Return the examples of partition ``partition_id`` out of ``num_partitions``."""
        ...


def _shuffle_seed(seed: int, server_round: int, partition_id: int) -> int:
    # Derive an independent stream per (run seed, round, client) so no two
    # clients or rounds share a shuffling order.
    digest = hashlib.sha256(f"{seed}:{server_round}:{partition_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _partition_of(context: Context) -> tuple[int, int]:
    try:
        partition_id = int(context.node_config[_PARTITION_ID])
        num_partitions = int(context.node_config[_NUM_PARTITIONS])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"node config must set integer {_PARTITION_ID!r} and {_NUM_PARTITIONS!r}"
        ) from exc
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} outside [0, {num_partitions})")
    return partition_id, num_partitions


def _dpsgd_plan(
    settings: SampleDpSettings,
    num_examples: int,
    train_config: TrainConfig,
    *,
    state: RecordDict,
) -> tuple[DpSgdConfig, GaussianSteps]:
    """Return this round's DP-SGD config (fixed noise) and the spend it will cost the device.

    A target epsilon's noise is searched once per run: the plan is kept in the
    device's own ``state`` (:mod:`fl_client.noise_plan`).
    """
    # Imported here: Opacus is only needed on devices that run DP-SGD.
    from fl_client.dp_sgd import DpSgdConfig, planned_spend, poisson_schedule
    from fl_client.noise_plan import NoiseSearch, noise_multiplier_in

    noise = settings.noise_multiplier
    if noise == 0:
        # The noise that reaches the target after every local epoch of the run.
        sample_rate, steps = poisson_schedule(num_examples, train_config)
        search = NoiseSearch(
            target_epsilon=settings.target_epsilon,
            delta=settings.delta,
            sample_rate=sample_rate,
            steps=steps // train_config.local_epochs * settings.total_epochs,
        )
        noise = noise_multiplier_in(state, search)
    config = DpSgdConfig(
        max_grad_norm=settings.max_grad_norm, noise_multiplier=noise, delta=settings.delta
    )
    return config, planned_spend(num_examples, train_config, config)


def _shared_noise_step(
    msg: Message,
    fields: ConfigRecord,
    network: nn.Module,
    examples: tuple[npt.NDArray[Any], npt.NDArray[np.integer]],
    *,
    policy: DevicePolicy | None,
    encoding: InputEncoding,
) -> Message:
    """Return this device's clipped gradient sum for a shared-noise DP-SGD round.

    Only inside this device's own secure round (the secure-aggregation mod's marker):
    anywhere else the sum would leave the device in clear.
    """
    try:
        if not inside_secure_round(msg.content):
            raise PolicyViolation(
                "shared-noise DP-SGD outside a secure round would send the gradient sum in clear"
            )
        if policy is None:
            raise PolicyViolation("shared-noise DP-SGD: this device has no policy to check it")
        config = SampleDdpConfig.from_fields(fields)
        policy.check_sample_distributed(config)
    except (ConfigError, PolicyViolation) as exc:
        logger.warning("shared-noise DP-SGD: refusing the round: %s", exc)
        return declined(msg, exc)
    # Imported here: Opacus (behind the per-example engines) only on devices that need it.
    from fl_client.per_example import CsprngRandomness

    vector, _ = clipped_gradient_sum(
        network,
        *examples,
        example_clip=config.example_clip,
        sample_rate=config.sample_rate,
        randomness=CsprngRandomness(SystemRandomSource()),
        encoding=encoding,
    )
    content = RecordDict(
        {
            GRADIENT_SUM_KEY: gradient_sum_record(vector),
            METRICS_KEY: MetricRecord({"dp-sample-rate": config.sample_rate}),
        }
    )
    return Message(content=content, reply_to=msg)


def make_client_app(
    provider: PartitionProvider,
    *,
    model: ModelName | ModelSpec = ModelName.CNN,
    num_threads: int = 1,
    mods: Sequence[Mod] = (),
    budget: ClientBudget | None = None,
    device: DeviceKind = DeviceKind.AUTO,
    policy: DevicePolicy | None = None,
    answer_partition: bool = False,
) -> ClientApp:
    """Build a Flower ClientApp that trains ``model`` on ``provider``'s partition.

    Parameters
    ----------
    provider
        Gives each node its examples, keyed by the node's ``partition-id``.
    model
        The architecture the server's weights belong to: a built-in name, or a
        :class:`~edge_runtime.model_spec.ModelSpec` (any torch model by import path,
        with the encoding of the provider's examples).
    num_threads
        Torch intra-op threads per client; 1 when several clients share a machine.
    mods
        Flower mods around the train handler, outermost first; fedge's own must be in
        their one valid order (:func:`fl_client.composition.device_mods` builds them so,
        and :func:`fl_client.mod_order.check_mod_order` refuses any other).
    budget
        The device's own privacy budget: a DP-SGD round (``fedge.dpsgd``) past it
        is declined, and every DP-SGD round is recorded in the device's ledger
        (the other mechanisms are guarded by :func:`fl_client.budget.make_budget_mod`).
    policy
        The device's policy: a DP-SGD round (``fedge.dpsgd``) is checked against
        its clip and noise bounds, and refused when the device has no policy.
    answer_partition
        Simulations only: answer ``query.partition`` messages with the node's
        partition id, so a seeded sampler can order simulated nodes (Flower draws
        fresh node ids for every simulated run). A deployment never sets it.
    device
        Where non-private local training runs (:func:`fl_client.device.select_device`:
        CUDA, then MPS, then the CPU with ``AUTO``). DP-SGD stays on the CPU: its
        CSPRNG noise and sampling are produced on the host.

    Notes
    -----
    Only the updated weights and two scalars (example count, mean loss) leave
    the client; the examples never do.
    """
    if num_threads < 1:
        raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
    check_mod_order(mods)
    spec = model if isinstance(model, ModelSpec) else ModelSpec.of(model)
    chosen = select_device(device)
    logger.info("client training device: %s (%s)", chosen.device, chosen.reason)
    app = ClientApp(mods=list(mods))

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(num_threads)
        instruction = decode_train_instruction(msg.content)
        partition_id, num_partitions = _partition_of(context)
        images, labels = provider(partition_id, num_partitions)
        network = spec.build()
        network.load_state_dict(instruction.arrays.to_torch_state_dict(), strict=True)
        generator = torch.Generator().manual_seed(
            _shuffle_seed(instruction.seed, instruction.server_round, partition_id)
        )
        dpsgd = msg.content.config_records.get(DPSGD_RECORD_KEY)
        sddp = msg.content.config_records.get(SDDP_RECORD_KEY)
        extra: dict[str, int | float] = {}
        if sddp is not None:
            return _shared_noise_step(
                msg, sddp, network, (images, labels), policy=policy, encoding=spec.encoding
            )
        if dpsgd is None:
            result = train(
                network,
                images,
                labels,
                instruction.config,
                generator=generator,
                device=chosen.device,
                encoding=spec.encoding,
            )
        else:
            try:
                if policy is None:
                    raise PolicyViolation("DP-SGD: this device has no policy to check the round")
                settings = SampleDpSettings.from_fields(dpsgd)
                policy.check_sample(settings)
                # A target epsilon no noise reaches is a ConfigError: declined like the rest.
                dp_config, spend = _dpsgd_plan(
                    settings, len(images), instruction.config, state=context.state
                )
                # The noise a target epsilon led to meets the policy's floor too.
                policy.check_sample_noise(spend.noise_multiplier)
            except (ConfigError, PolicyViolation) as exc:
                logger.warning("DP-SGD: refusing the round: %s", exc)
                return declined(msg, exc)
            ledger = None
            if budget is not None:
                ledger = budget.ledger_for(context)
                own = ClientSpend(mechanism="dp-sgd", gaussian=spend)
                try:
                    budget.check(ledger, own)
                except ClientBudgetExhausted as exc:
                    return declined(msg, exc)
            from fl_client.dp_sgd import train_private

            private = train_private(
                network,
                images,
                labels,
                instruction.config,
                dp_config,
                generator=generator,
                encoding=spec.encoding,
            )
            result = TrainResult(num_examples=private.num_examples, mean_loss=private.mean_loss)
            spent = private.spend
            if ledger is not None:
                ledger.record(
                    instruction.server_round, ClientSpend(mechanism="dp-sgd", gaussian=spent)
                )
            extra = {
                "dp-noise-multiplier": spent.noise_multiplier,
                "dp-sample-rate": spent.sample_rate,
                "dp-steps": spent.steps,
                "dp-epsilon": private.epsilon,
            }
        logger.debug(
            "partition %d trained on %d examples, loss %.4f",
            partition_id,
            result.num_examples,
            result.mean_loss,
        )
        content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord(network.state_dict()),
                METRICS_KEY: MetricRecord(
                    # With DP-SGD the loss (computed without noise) stays on the device.
                    {"num-examples": result.num_examples, **extra}
                    if extra
                    else {"num-examples": result.num_examples, "train-loss": result.mean_loss}
                ),
            }
        )
        return Message(content=content, reply_to=msg)

    if answer_partition:

        @app.query(PARTITION_QUERY)
        def _partition(msg: Message, context: Context) -> Message:
            partition_id, _ = _partition_of(context)
            record = MetricRecord({PARTITION_ID_METRIC: partition_id})
            return Message(content=RecordDict({METRICS_KEY: record}), reply_to=msg)

    return app
