"""Turn a deployment's configuration into the coordinator's :class:`RunPlan`."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from edge_runtime.local_data import load_examples
from edge_runtime.models import build_model
from fedge.errors import ConfigError, DataError
from fl_server.coordinator import PrivacyPlan, RunPlan
from fl_server.deployment import DeploymentConfig, DeploymentLayout
from fl_server.evaluation import central_evaluator
from fl_server.federation import FederationConfig
from fl_server.privacy import PrivacyMechanism, ServerDp
from fl_server.secagg import SecAggConfig
from secure_agg.params import ThreatModel
from strategies.accounting import AccountantKind
from strategies.central import CentralDpSettings, LocalDpSettings
from strategies.ddp import DistributedDpSettings
from strategies.dp_mode import DpMode
from strategies.sample_dp import SampleDpSettings
from strategies.train_config import train_fields

__all__ = ["authority_public_key", "build_plan", "config_json"]


def authority_public_key(layout: DeploymentLayout) -> bytes:
    """Return the enrolment authority's public key (never its private key)."""
    try:
        key = bytes.fromhex(layout.authority_public_key.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {layout.authority_public_key}: {exc}") from None
    if len(key) != 32:
        raise ConfigError(f"{layout.authority_public_key} does not hold a 32-byte key")
    return key


def config_json(config: DeploymentConfig) -> dict[str, Any]:
    """Return the configuration as recorded in ``run.started`` (no secrets: the URL redacted)."""
    from dataclasses import asdict

    from sqlalchemy.engine import make_url

    raw = asdict(config)
    url = config.server.database_url
    raw["server"]["database_url"] = (
        make_url(url).render_as_string(hide_password=True) if url else ""
    )
    raw["server"]["sans"] = list(config.server.sans)
    raw["federation"]["model"] = config.federation.model.value
    if not config.federation.model_name:
        # The default name is not recorded, so a configuration written before the key
        # existed keeps its hash (a run in progress across an upgrade still resumes).
        del raw["federation"]["model_name"]
    raw["secure_aggregation"]["threat_model"] = config.secure_aggregation.threat_model.value
    raw["privacy"]["mode"] = config.privacy.mode.value
    return raw


def _secure(config: DeploymentConfig, authority: bytes) -> SecAggConfig | None:
    secure = config.secure_aggregation
    if not secure.enabled:
        return None
    privacy = config.privacy
    return SecAggConfig(
        clip_range=secure.clip_range,
        ring_bits=secure.ring_bits,
        threat_model=secure.threat_model,
        authority_public_key=authority if secure.threat_model is ThreatModel.ACTIVE else None,
        dropout_fraction=secure.dropout,
        min_clients=2,
        prekeys=True,
        distributed_dp=(
            DistributedDpSettings(
                l2_clip=privacy.clip,
                noise_multiplier=privacy.noise_multiplier,
                ring_bits=secure.ring_bits,
                min_honest_contributors=privacy.min_honest_contributors,
            )
            if privacy.mode is DpMode.DISTRIBUTED
            else None
        ),
    )


def _server_dp(config: DeploymentConfig) -> ServerDp | None:
    privacy = config.privacy
    if privacy.mode is DpMode.CENTRAL:
        return ServerDp(
            central=CentralDpSettings(
                l2_clip=privacy.clip, noise_multiplier=privacy.noise_multiplier
            ),
            secure=config.secure_aggregation.enabled,
        )
    if privacy.mode is DpMode.LOCAL:
        return ServerDp(
            local=LocalDpSettings(l2_clip=privacy.clip, noise_multiplier=privacy.noise_multiplier),
            secure=config.secure_aggregation.enabled,
        )
    if privacy.mode is DpMode.SAMPLE:
        return ServerDp(
            sample=SampleDpSettings(
                max_grad_norm=privacy.clip,
                # With a target epsilon each device derives its own noise from it.
                noise_multiplier=0.0 if privacy.epsilon is not None else privacy.noise_multiplier,
                target_epsilon=privacy.epsilon or 0.0,
                delta=privacy.delta,
                total_epochs=config.federation.rounds * config.training.local_epochs,
            ),
            secure=config.secure_aggregation.enabled,
        )
    return None


def build_plan(config: DeploymentConfig, layout: DeploymentLayout, run_id: str) -> RunPlan:
    """Return the plan of run ``run_id`` of this deployment.

    Raises
    ------
    DataError
        If the evaluation set is missing or malformed.
    ConfigError
        If the configuration cannot be satisfied.
    """
    federation = config.federation
    eval_path = layout.root / config.evaluation.data
    if not eval_path.exists():
        raise DataError(
            f"no evaluation set at {eval_path}: make one with "
            f"`fedge sim samples --count 2000 --out {eval_path}`"
        )
    images, labels = load_examples(eval_path)
    images, labels = images[: config.evaluation.examples], labels[: config.evaluation.examples]
    model = build_model(federation.model, seed=federation.seed)

    mode = config.privacy.mode
    privacy = (
        None
        if mode is DpMode.OFF
        else PrivacyPlan(
            mechanism=PrivacyMechanism.of(mode),
            # Sample-level DP: epsilon is each device's DP-SGD target, not a run budget.
            epsilon=None if mode is DpMode.SAMPLE else config.privacy.epsilon,
            delta=config.privacy.delta,
            client_lifetime_epsilon=config.privacy.client_lifetime_epsilon,
            accountant=AccountantKind.PRV if mode is DpMode.SAMPLE else AccountantKind.RDP,
            fraction_train=federation.clients_per_round / federation.min_clients,
        )
    )
    fields: dict[str, Any] = dict(train_fields(config.training, seed=federation.seed))
    return RunPlan(
        run_id=run_id,
        model_name=federation.store_model_name,
        federation=FederationConfig(
            num_rounds=federation.rounds,
            fraction_train=federation.clients_per_round / federation.min_clients,
            min_train_nodes=federation.clients_per_round,
            min_available_nodes=federation.min_clients,
            round_timeout_s=federation.round_timeout_s,
        ),
        initial_arrays=ArrayRecord(model.state_dict()),
        train_config=ConfigRecord(fields),
        evaluate=central_evaluator(federation.model, images, labels),
        config_json=config_json(config),
        data_stats={"evaluation_examples": len(images)},
        secure=_secure(config, authority_public_key(layout)),
        dp=_server_dp(config),
        privacy=privacy,
    )
