"""fedge server init: the files, their modes, the PKI, the database; build_plan per privacy mode."""

from __future__ import annotations

import ipaddress
import json
import re
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_runtime.secret_files import read_secret
from fedge.errors import ConfigError, DataError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.trust import AuditTrust
from fl_server.coordinator import RunPlan
from fl_server.db import open_database
from fl_server.deployment import (
    DeploymentConfig,
    DeploymentLayout,
    EvaluationSection,
    FederationSection,
    PrivacySection,
    SecureSection,
    ServerSection,
    load_config,
)
from fl_server.deployment_init import ca_fingerprint, init_deployment
from fl_server.deployment_plan import authority_public_key, build_plan, config_json
from fl_server.enrolment.authority import read_authority
from fl_server.privacy import PrivacyMechanism
from fl_server.store.keys import StoreKey
from secure_agg.params import ThreatModel
from strategies.accounting import AccountantKind
from strategies.ddp import DistributedDpSettings
from strategies.dp_mode import DpMode
from tests.helpers import stripes

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_eval(path: Path, count: int = 12) -> Path:
    images, labels = stripes(count, seed=3)
    np.savez(path, images=images, labels=labels)
    return path


def _san_strings(certificate: x509.Certificate) -> list[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


@pytest.fixture
def layout(tmp_path: Path) -> DeploymentLayout:
    return init_deployment(tmp_path / "dep", now=NOW)


def test_init_makes_every_file_with_private_modes_for_secrets(layout: DeploymentLayout) -> None:
    secrets = [
        layout.ca_key,
        layout.server_key,
        layout.authority_key,
        layout.superexec_secret,
        layout.store / "store-key.pem",
        AuditTrust.of_home(layout.root).key_path,
    ]
    public = [
        layout.config,
        layout.ca_cert,
        layout.server_cert,
        layout.authority_public_key,
        layout.database,
    ]

    for path in secrets:
        assert _mode(path) == 0o600, path
        read_secret(path)  # passes the private-file check
    for path in public:
        assert path.is_file(), path
    for directory in (layout.tls, layout.logs, layout.runs, layout.store):
        assert directory.is_dir(), directory
    assert _mode(layout.root) == 0o700
    assert _mode(layout.state) == 0o700
    assert _mode(layout.authority_key.parent) == 0o700
    assert len(read_secret(layout.superexec_secret)) == 32
    assert not layout.current_run.exists()


def test_the_authority_public_key_file_matches_its_private_key(layout: DeploymentLayout) -> None:
    authority = read_authority(layout.authority_key)

    assert authority_public_key(layout) == authority.public_key
    assert layout.authority_public_key.read_text(encoding="ascii").endswith("\n")


def test_the_store_key_is_made_once_and_reloads(layout: DeploymentLayout) -> None:
    path = layout.store / "store-key.pem"
    before = path.read_bytes()

    StoreKey.load_or_create(path)

    assert path.read_bytes() == before


def test_the_server_certificate_names_the_sans_and_loopback_and_is_issued_by_the_ca(
    tmp_path: Path,
) -> None:
    layout = init_deployment(tmp_path / "dep", sans=("fedge.example", "10.1.2.3"), now=NOW)
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())

    server.verify_directly_issued_by(ca)
    assert _san_strings(server) == ["fedge.example", "10.1.2.3", "127.0.0.1"]
    ip_names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in ip_names.get_values_for_type(x509.IPAddress)
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.not_valid_before_utc == NOW
    assert ca.not_valid_before_utc == NOW
    assert server.not_valid_after_utc == NOW + timedelta(days=825)
    assert server.not_valid_after_utc < ca.not_valid_after_utc


def test_loopback_is_not_repeated_when_given(tmp_path: Path) -> None:
    layout = init_deployment(tmp_path / "dep", sans=("127.0.0.1", "localhost"), now=NOW)
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())

    assert _san_strings(server) == ["127.0.0.1", "localhost"]


def test_the_config_records_the_chosen_server_section(tmp_path: Path) -> None:
    layout = init_deployment(
        tmp_path / "dep",
        sans=("::1", "fedge.example"),
        address="0.0.0.0:8443",
        now=NOW,
    )

    config = load_config(layout.config)

    assert config.server.sans == ("::1", "fedge.example", "127.0.0.1")
    assert config.server.address == "0.0.0.0:8443"
    assert config.server.public_url == "https://[::1]:8443"
    assert config.server.database_url == ""
    assert config == replace(DeploymentConfig(), server=config.server)


def test_a_given_public_url_and_starting_config_are_kept(tmp_path: Path) -> None:
    start = DeploymentConfig(
        federation=FederationSection(rounds=9, min_clients=4, clients_per_round=2),
        server=ServerSection(superlink_port=19092),
    )

    layout = init_deployment(
        tmp_path / "dep", public_url="https://fedge.example", config=start, now=NOW
    )
    config = load_config(layout.config)

    assert config.federation == start.federation
    assert config.server.public_url == "https://fedge.example"
    assert config.server.superlink_port == 19092


def test_the_config_is_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = open_database
    root = tmp_path / "dep"

    def spy(url: str | None = None, *, create: bool = True) -> object:
        seen.append(DeploymentLayout(root).config.exists())
        return real(url, create=create)

    monkeypatch.setattr("fl_server.deployment_init.open_database", spy)

    init_deployment(root, now=NOW)

    assert seen == [False]
    assert DeploymentLayout(root).config.exists()


def test_the_database_is_created_and_migrated(layout: DeploymentLayout) -> None:
    url = layout.database_url(load_config(layout.config))

    engine = open_database(url, create=False)
    try:
        with engine.connect() as connection:
            tables = set(engine.dialect.get_table_names(connection))
    finally:
        engine.dispose()

    assert {"alembic_version"} <= tables
    assert len(tables) > 1


def test_init_records_every_key_it_makes_by_public_names_only(layout: DeploymentLayout) -> None:
    engine = open_database(layout.database_url(load_config(layout.config)), create=False)
    try:
        events = list(AuditLog(engine).iter())
    finally:
        engine.dispose()
    authority = read_authority(layout.authority_key)
    store_key = StoreKey.load_or_create(layout.store / "store-key.pem")
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())

    assert [e.kind for e in events] == [AuditEventKind.KEY_CREATED] * 6
    by_purpose = {e.payload["purpose"]: dict(e.payload) for e in events}
    assert by_purpose["tls_ca"] == {
        "purpose": "tls_ca",
        "algorithm": "ecdsa-secp256r1",
        "key_id": f"{ca.serial_number:x}",
        "public_key": None,
        "fingerprint_sha256": ca_fingerprint(layout.ca_cert.read_bytes()).removeprefix("sha256:"),
        "not_after": ca.not_valid_after_utc.isoformat(),
        "created_by": "fedge server init",
    }
    assert by_purpose["tls_server"]["key_id"] == f"{server.serial_number:x}"
    assert by_purpose["tls_server"]["not_after"] == server.not_valid_after_utc.isoformat()
    assert by_purpose["enrolment_authority"]["public_key"] == authority.public_key.hex()
    assert by_purpose["enrolment_authority"]["algorithm"] == "ed25519"
    assert (by_purpose["store_signing"]["key_id"], by_purpose["store_signing"]["public_key"]) == (
        store_key.key_id,
        store_key.public_key_bytes().hex(),
    )
    checkpoint_key = AuditTrust.of_home(layout.root).trusted_key()
    assert checkpoint_key is not None
    assert by_purpose["audit_checkpoint"]["public_key"] == checkpoint_key.hex()
    assert by_purpose["superexec_secret"] == {
        "purpose": "superexec_secret",
        "algorithm": "random-256",
        "key_id": None,
        "public_key": None,
        "fingerprint_sha256": None,
        "not_after": None,
        "created_by": "fedge server init",
    }
    trail = json.dumps([dict(e.payload) for e in events])
    assert authority.signing_seed.hex() not in trail
    assert read_secret(layout.superexec_secret).hex() not in trail
    assert layout.ca_key.read_text() not in trail


def test_ca_fingerprint_is_sha256_of_the_der_and_stable(layout: DeploymentLayout) -> None:
    pem = layout.ca_cert.read_bytes()

    fingerprint = ca_fingerprint(pem)

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert ca_fingerprint(pem) == fingerprint
    assert ca_fingerprint(pem.replace(b"\n", b"\r\n")) == fingerprint


def test_two_deployments_have_different_cas(tmp_path: Path) -> None:
    first = init_deployment(tmp_path / "a", now=NOW)
    second = init_deployment(tmp_path / "b", now=NOW)

    assert ca_fingerprint(first.ca_cert.read_bytes()) != ca_fingerprint(second.ca_cert.read_bytes())
    assert authority_public_key(first) != authority_public_key(second)


def test_ca_fingerprint_refuses_what_is_not_a_certificate() -> None:
    with pytest.raises(ConfigError, match=r"^not a PEM certificate$"):
        ca_fingerprint(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_an_existing_deployment_is_never_overwritten(layout: DeploymentLayout) -> None:
    before = layout.ca_cert.read_bytes()

    with pytest.raises(ConfigError, match=r"is already a fedge deployment \(fedge-server.toml"):
        init_deployment(layout.root, now=NOW)

    assert layout.ca_cert.read_bytes() == before


def test_a_non_empty_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "dep"
    root.mkdir()
    (root / "notes.txt").write_text("mine", encoding="utf-8")

    with pytest.raises(ConfigError, match=r"is not empty; give a new or empty directory"):
        init_deployment(root, now=NOW)

    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_an_existing_empty_directory_is_used(tmp_path: Path) -> None:
    root = tmp_path / "dep"
    root.mkdir()

    layout = init_deployment(root, now=NOW)

    assert layout.config.is_file()


def test_a_file_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dep"
    path.write_text("x", encoding="utf-8")

    with pytest.raises(ConfigError, match=r"dep is not a directory$"):
        init_deployment(path, now=NOW)


def test_a_truncated_eval_set_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    whole = _write_eval(tmp_path / "eval.npz").read_bytes()
    broken = tmp_path / "broken.npz"
    broken.write_bytes(whole[: len(whole) // 2])
    root = tmp_path / "dep"

    with pytest.raises(DataError, match=r"broken.npz is not a readable .npz file"):
        init_deployment(root, eval_data=broken, now=NOW)

    assert not root.exists()


def test_a_valid_eval_set_is_copied_in(tmp_path: Path) -> None:
    source = _write_eval(tmp_path / "held-out.npz")

    layout = init_deployment(tmp_path / "dep", eval_data=source, now=NOW)

    assert (layout.root / "eval.npz").read_bytes() == source.read_bytes()


# ---------------------------------------------------------------- build_plan


def _config(mode: DpMode, *, secure: bool = True, epsilon: float | None = 4.0) -> DeploymentConfig:
    return DeploymentConfig(
        federation=FederationSection(rounds=4, min_clients=6, clients_per_round=3),
        secure_aggregation=SecureSection(enabled=secure),
        privacy=PrivacySection(
            mode=mode, epsilon=epsilon, clip=0.7, noise_multiplier=1.3, delta=1e-6
        ),
        evaluation=EvaluationSection(examples=8),
    )


@pytest.fixture
def planned(layout: DeploymentLayout) -> DeploymentLayout:
    _write_eval(layout.root / "eval.npz")
    return layout


def _plan(layout: DeploymentLayout, config: DeploymentConfig) -> RunPlan:
    return build_plan(config, layout, "run-1")


def test_plan_without_dp(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.OFF))

    assert plan.dp is None
    assert plan.privacy is None
    assert plan.secure is not None
    assert plan.secure.distributed_dp is None


def test_plan_central_dp(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.CENTRAL))

    assert plan.dp is not None and plan.dp.central is not None
    assert (plan.dp.central.l2_clip, plan.dp.central.noise_multiplier) == (0.7, 1.3)
    assert plan.dp.local is None and plan.dp.sample is None
    assert plan.dp.secure is True
    assert plan.secure is not None and plan.secure.distributed_dp is None
    assert plan.privacy is not None
    assert plan.privacy.mechanism is PrivacyMechanism.CENTRAL
    assert (plan.privacy.epsilon, plan.privacy.delta) == (4.0, 1e-6)
    assert plan.privacy.accountant is AccountantKind.RDP


def test_plan_local_dp_without_secure_aggregation(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.LOCAL, secure=False))

    assert plan.dp is not None and plan.dp.local is not None
    assert plan.dp.local.l2_clip == 0.7
    assert plan.dp.secure is False
    assert plan.secure is None
    assert plan.privacy is not None
    assert plan.privacy.mechanism is PrivacyMechanism.LOCAL


def test_plan_distributed_dp(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.DISTRIBUTED))

    assert plan.dp is None
    assert plan.secure is not None
    assert isinstance(plan.secure.distributed_dp, DistributedDpSettings)
    assert plan.secure.distributed_dp.l2_clip == 0.7
    assert plan.secure.distributed_dp.noise_multiplier == 1.3
    assert plan.secure.threat_model is ThreatModel.ACTIVE
    assert plan.secure.authority_public_key == authority_public_key(planned)
    assert plan.privacy is not None
    assert plan.privacy.mechanism is PrivacyMechanism.DISTRIBUTED
    assert plan.privacy.epsilon == 4.0


def test_plan_semi_honest_secure_aggregation_pins_no_authority(planned: DeploymentLayout) -> None:
    config = replace(
        _config(DpMode.OFF),
        secure_aggregation=SecureSection(threat_model=ThreatModel.SEMI_HONEST),
    )

    plan = _plan(planned, config)

    assert plan.secure is not None and plan.secure.authority_public_key is None


def test_plan_sample_dp_with_a_target_epsilon(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.SAMPLE))

    assert plan.dp is not None and plan.dp.sample is not None
    sample = plan.dp.sample
    assert (sample.max_grad_norm, sample.noise_multiplier, sample.target_epsilon) == (0.7, 0, 4)
    assert (sample.delta, sample.total_epochs) == (1e-6, 4)
    assert plan.privacy is not None
    assert plan.privacy.mechanism is PrivacyMechanism.SAMPLE
    assert plan.privacy.epsilon is None  # each device's target, not a run budget
    assert plan.privacy.accountant is AccountantKind.PRV


def test_plan_sample_dp_with_fixed_noise(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.SAMPLE, epsilon=None))

    assert plan.dp is not None and plan.dp.sample is not None
    assert (plan.dp.sample.noise_multiplier, plan.dp.sample.target_epsilon) == (1.3, 0.0)


def test_plan_samples_clients_per_round_of_min_clients(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.CENTRAL))

    assert plan.federation.fraction_train == 0.5
    assert plan.privacy is not None and plan.privacy.fraction_train == 0.5
    assert plan.federation.min_train_nodes == 3
    assert plan.federation.min_available_nodes == 6
    assert plan.federation.num_rounds == 4


def test_plan_evaluates_on_the_first_examples(planned: DeploymentLayout) -> None:
    plan = _plan(planned, _config(DpMode.OFF))

    result = plan.evaluate(plan.initial_arrays)

    assert plan.data_stats == {"evaluation_examples": 8}
    assert 0.0 <= result.accuracy <= 1.0
    assert np.isfinite(result.loss)
    assert plan.run_id == "run-1"
    assert plan.model_name == "cnn"


def test_plan_without_an_eval_set_says_how_to_make_one(layout: DeploymentLayout) -> None:
    with pytest.raises(DataError, match=r"no evaluation set at .*eval.npz: make one with") as info:
        _plan(layout, _config(DpMode.OFF))

    assert "`fedge sim samples --count 2000 --out " in str(info.value)


def test_plan_refuses_a_damaged_authority_key(planned: DeploymentLayout) -> None:
    planned.authority_public_key.write_text("abcd\n", encoding="ascii")

    with pytest.raises(ConfigError, match=r"authority.pub does not hold a 32-byte key"):
        _plan(planned, _config(DpMode.OFF))


def test_authority_public_key_refuses_a_missing_or_non_hex_file(
    layout: DeploymentLayout,
) -> None:
    layout.authority_public_key.write_text("zz\n", encoding="ascii")
    with pytest.raises(ConfigError, match=r"^cannot read .*authority.pub: "):
        authority_public_key(layout)

    layout.authority_public_key.unlink()
    with pytest.raises(ConfigError, match=r"^cannot read .*authority.pub: "):
        authority_public_key(layout)


def test_config_json_hides_the_database_password() -> None:
    config = DeploymentConfig(
        server=ServerSection(database_url="postgresql+psycopg://fedge:hunter2@db:5432/fedge")
    )

    document = config_json(config)

    assert "hunter2" not in str(document)
    assert document["server"]["database_url"] == "postgresql+psycopg://fedge:***@db:5432/fedge"
    assert document["privacy"]["mode"] == "distributed"
    assert document["server"]["sans"] == ["localhost", "127.0.0.1"]
