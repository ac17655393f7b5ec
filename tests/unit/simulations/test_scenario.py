"""Scenario files: every malformed file gets one clear error naming the file, table and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.models import InputEncoding
from fedge.cli import main
from simulations.attacks import AttackKind
from simulations.modes import DpMode, NormBoundSite
from simulations.scenario import ScenarioError, load_scenario, parse_scenario
from simulations.scenario_schema import schema_markdown
from strategies.rules import AggregationRule

ROOT = Path(__file__).resolve().parents[3]


def _parse(document: dict[str, object]) -> object:
    return parse_scenario({"scenario": {"name": "s"}, **document}, source="s.toml")


def test_a_minimal_scenario_takes_every_default() -> None:
    scenario = parse_scenario({"scenario": {"name": "tiny"}}, source="s.toml")

    config = scenario.sim_config(InputEncoding.UINT8_IMAGES)

    assert scenario.name == "tiny"
    assert (config.num_clients, config.num_rounds, config.fraction_train) == (10, 5, 1.0)
    assert config.strategy.rule is AggregationRule.FEDAVG and not config.secure_agg


def test_a_full_scenario_maps_onto_the_simulation(tmp_path: Path) -> None:
    path = tmp_path / "full.toml"
    path.write_text(
        """
[scenario]
name = "full"
rounds = 3
seed = 7
[population]
clients = 20
per_round = 7
[data]
dir = "fashion"
partition = "shards"
shards_per_client = 3
[model]
name = "tests.unit.edge_runtime.test_model_spec:TinyNet"
args = { in_features = 9, num_classes = 7 }
[training]
learning_rate = 0.1
[strategy]
name = "fedadam"
options = { eta = 0.01 }
[secure_aggregation]
enabled = true
ring_bits = 16
[privacy]
mode = "distributed"
epsilon = 4.0
[attack]
kind = "scale"
fraction = 0.1
scale = 3.0
[defence]
norm_bound = 1.5
""",
        encoding="utf-8",
    )

    scenario = load_scenario(path)
    config = scenario.sim_config(InputEncoding.FLOAT32, num_classes=7)

    assert config.sampled_clients == 7 and config.seed == 7
    assert config.data_dir == tmp_path / "fashion"  # relative to the file
    assert config.shards_per_client == 3
    assert config.model_spec is not None and config.model_spec.kwargs == (
        ("in_features", 9),
        ("num_classes", 7),
    )
    assert config.strategy.kwargs == {"eta": 0.01}
    assert config.secure_agg and config.ring_bits == 16 and config.dp is DpMode.DISTRIBUTED
    assert config.attack is not None and config.attack.kind is AttackKind.SCALE
    assert config.attack.byzantine_partitions(20) == config.attack.byzantine_partitions(20)
    assert (config.norm_bound, config.norm_bound_site) == (1.5, NormBoundSite.DEVICE)
    assert scenario.to_json()["population"] == {
        "clients": 20,
        "per_round": 7,
        "parallelism": None,
        "ray_address": None,
    }


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({"populaton": {}}, r"s.toml: unknown table \[populaton\]; a scenario has \[scenario\]"),
        ({"data": {"alpah": 1}}, r"\[data\] has no field 'alpah' \(did you mean 'alpha'\?\)"),
        ({"data": {"alpha": -1}}, r"s.toml: \[data\] alpha: must be > 0, got -1.0"),
        ({"data": {"partition": "random"}}, r"\[data\] partition: expected one of \['iid'"),
        ({"data": {"train_examples": "all"}}, r"\[data\] train_examples: expected an integer"),
        ({"population": {"clients": 3, "per_round": 5}}, r"\[population\] per_round: must be"),
        ({"population": {"clients": True}}, r"\[population\] clients: expected an integer, got"),
        ({"training": {"batch_size": 0}}, r"\[training\] batch_size: must be >= 1, got 0"),
        ({"training": {"momentum": 1.5}}, r"\[training\] momentum: must be in \[0, 1\)"),
        ({"model": {"name": "resnet"}}, r"\[model\] name: 'resnet' is neither a built-in"),
        ({"model": {"name": "cnn", "args": {"x": 1}}}, r"\[model\] args: the built-in model"),
        ({"model": {"args": {"x": {"y": 1}}}}, r"\[model\] args: x: expected a number"),
        ({"strategy": {"name": "fedadamm"}}, r"\[strategy\] name: expected one of \['fedavg'"),
        (
            {"strategy": {"name": "fedadam", "options": {"et": 1}}},
            r"\[strategy\] options: fedadam has no option 'et' \(it accepts: beta_1",
        ),
        ({"secure_aggregation": {"enabled": "yes"}}, r"enabled: expected true or false"),
        ({"privacy": {"mode": "on"}}, r"\[privacy\] mode: expected one of \['off'"),
        ({"privacy": {"delta": float("nan")}}, r"\[privacy\] delta: expected a finite number"),
        (
            {"attack": {"kind": "backdoor", "fraction": 2.0}},
            r"\[attack\] fraction: must be a number in \[0, 1\]",
        ),
        ({"defence": {"norm_bound": 0}}, r"\[defence\] norm_bound: must be > 0"),
        ({"devices": {"availability": 0}}, r"\[devices\] availability: must be in"),
        ({"failures": {"dropout_stage": "lunch"}}, r"\[failures\] dropout_stage: expected one of"),
        ({"failures": {"round_deadline_s": 0}}, r"\[failures\] round_deadline_s: must be > 0"),
        ({"scenario": {"name": "Bad Name"}}, r"\[scenario\] name: use lowercase letters"),
        ({"scenario": {"rounds": 0, "name": "s"}}, r"\[scenario\] rounds: must be >= 1"),
        ({"scenario": "quick"}, r"\[scenario\]: expected a table"),
    ],
)
def test_a_malformed_table_gets_one_error_naming_the_field(
    document: dict[str, object], match: str
) -> None:
    with pytest.raises(ScenarioError, match=match):
        scenario = _parse(document)
        scenario.sim_config(InputEncoding.UINT8_IMAGES)  # type: ignore[attr-defined]


def test_the_name_is_required() -> None:
    with pytest.raises(ScenarioError, match=r"\[scenario\] is required"):
        parse_scenario({}, source="s.toml")
    with pytest.raises(ScenarioError, match=r"\[scenario\] name: required"):
        parse_scenario({"scenario": {"rounds": 2}}, source="s.toml")


@pytest.mark.parametrize(
    ("document", "match"),
    [
        (
            {"strategy": {"name": "krum"}, "secure_aggregation": {"enabled": True}},
            r"\[strategy\] name: krum must see every device's update",
        ),
        (
            {"strategy": {"name": "fedmedian"}, "privacy": {"mode": "central"}},
            r"\[strategy\] name: fedmedian would see one noisy aggregate",
        ),
        (
            {"defence": {"norm_bound": 1.0, "site": "server"}, "privacy": {"mode": "distributed"}},
            r"\[defence\] site: 'server' needs every device's update",
        ),
        ({"privacy": {"epsilon": 3.0}}, r"\[privacy\] epsilon: set a mode too"),
        ({"defence": {"compare": True}}, r"\[defence\] compare: there is no \[attack\]"),
        (
            {"attack": {"kind": "scale"}, "defence": {"compare": True}},
            r"\[defence\] compare: there is no defence",
        ),
        (
            {
                "population": {"clients": 10, "per_round": 2},
                "secure_aggregation": {"enabled": True},
            },
            "sample at least 3",
        ),
    ],
)
def test_tables_that_contradict_each_other_are_refused_naming_both(
    document: dict[str, object], match: str
) -> None:
    scenario = _parse(document)

    with pytest.raises(ScenarioError, match=match):
        scenario.sim_config(InputEncoding.UINT8_IMAGES)  # type: ignore[attr-defined]


def test_devices_and_failures_reach_the_simulation_and_their_absence_means_none() -> None:
    plain = parse_scenario({"scenario": {"name": "s"}}, source="s.toml")
    failing = parse_scenario(
        {
            "scenario": {"name": "s", "seed": 3},
            "devices": {"availability": 0.9},
            "failures": {"dropout_fraction": 0.2, "round_deadline_s": 60},
        },
        source="s.toml",
    )

    config = failing.sim_config(InputEncoding.UINT8_IMAGES)

    assert plain.devices is None and plain.failures is None
    assert plain.sim_config(InputEncoding.UINT8_IMAGES).failures is None
    assert config.devices is not None and config.devices.availability == 0.9
    assert config.devices.seed == 3
    assert config.failures is not None and config.failures.dropout_fraction == 0.2
    assert config.round_timeout_s == 60.0
    assert "devices" not in plain.to_json() and failing.to_json()["failures"]["time_scale"] == 1.0


def test_a_builtin_image_model_on_tabular_data_says_which_model_to_name() -> None:
    scenario = parse_scenario(
        {"scenario": {"name": "s"}, "data": {"dataset": "shuttle"}}, source="s.toml"
    )

    with pytest.raises(ScenarioError, match=r"simulations\.tabular:SensorMLP"):
        scenario.sim_config(InputEncoding.FLOAT32, num_classes=7)


def test_unreadable_and_invalid_files_say_so(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\nname = 1", encoding="utf-8")

    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match=r"missing\.toml: no such scenario file"):
        load_scenario(tmp_path / "missing.toml")


def test_the_documented_schema_is_the_enforced_one() -> None:
    documented = (ROOT / "docs" / "scenario-schema.md").read_text(encoding="utf-8")

    assert documented == schema_markdown(), (
        "docs/scenario-schema.md is stale: regenerate it with "
        "`fedge sim schema > docs/scenario-schema.md`"
    )


def test_the_cli_refuses_federation_flags_beside_a_scenario_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[scenario]\nname = "s"\n', encoding="utf-8")

    code = main(["sim", "run", str(path), "--clients", "3", "--home", str(tmp_path / "h")])

    assert code != 0
    assert "--clients cannot be combined with a scenario file" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_sim_check_validates_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDGE_HOME", str(tmp_path / "home"))
    bad_path = tmp_path / "bad.toml"
    bad_path.write_text('[scenario]\nname = "b"\n[data]\nalpha = 0\n', encoding="utf-8")

    good = main(["sim", "check", str(ROOT / "scenarios" / "quickstart.toml")])
    good_out = capsys.readouterr().out
    bad = main(["sim", "check", str(bad_path)])
    bad_err = capsys.readouterr().err

    assert good == 0
    assert "scenario 'quickstart' is valid: 10 clients, 5 per round" in good_out
    assert bad != 0 and "[data] alpha: must be > 0" in bad_err
    assert not (tmp_path / "home").exists()


def test_mlflow_without_its_extra_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    path = tmp_path / "s.toml"
    path.write_text('[scenario]\nname = "s"\n[output]\nmlflow = "sqlite:///x.db"\n', "utf-8")
    home = tmp_path / "home"

    flag = main(["sim", "run", "--mlflow", "sqlite:///x.db", "--home", str(home)])
    flag_err = capsys.readouterr().err
    table = main(["sim", "run", str(path), "--home", str(home)])
    table_err = capsys.readouterr().err

    assert flag != 0 and "--mlflow needs the mlflow extra" in flag_err
    assert table != 0 and "[output] mlflow needs the mlflow extra" in table_err
    assert not home.exists()
