from pathlib import Path

import pytest

from fedllm.config import ConfigError, config_from_json, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_shipped_experiment_loads_and_overrides_apply():
    cfg = load_config(REPO / "experiments" / "fedavg_lora.yaml", "rounds=7 client.lr=0.01 channel.kind=ideal")
    assert cfg.rounds == 7
    assert cfg.client.lr == 0.01
    assert cfg.strategy.name == "fedavg"
    assert cfg.model.name == "minilm"


def test_overrides_parse_yaml_values():
    assert parse_overrides("a.b=3 c=[x, y] d=true") == {"a": {"b": 3}, "c": ["x", "y"], "d": True}
    assert parse_overrides(["data.tasks=[topic,question]"]) == {"data": {"tasks": ["topic", "question"]}}


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, "rounds")


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, "client.learning_rate=0.1")
    msg = str(err.value)
    assert "client.learning_rate" in msg
    assert "allowed:" in msg and "lr" in msg and "batch_size" in msg


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"strategies: unknown key; allowed: model, peft"):
        load_config(None, "strategies.name=fedavg")


@pytest.mark.parametrize(
    "override, key",
    [
        ("rounds=-1", "rounds"),
        ("rounds=0", "rounds"),
        ("client.lr=0", "client.lr"),
        ("client.lr=-0.1", "client.lr"),
        ("strategy.fraction_train=1.5", "strategy.fraction_train"),
        ("client.batch_size=abc", "client.batch_size"),
        ("data.partition=random", "data.partition"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert f"  {key}:" in str(err.value)


def test_unknown_registry_names_list_allowed_names():
    with pytest.raises(ConfigError, match=r"strategy.name: unknown strategy 'fedavgg'; allowed: .*fedavg"):
        load_config(None, "strategy.name=fedavgg")
    with pytest.raises(ConfigError, match=r"unknown channel 'wifi'; allowed: .*ideal"):
        load_config(None, "channel.kind=wifi")
    with pytest.raises(ConfigError, match=r"unknown client trainer 'ppo'; allowed: .*supervised"):
        load_config(None, "client.trainer=ppo")
    with pytest.raises(ConfigError, match=r"unknown embedded task 'weather'; allowed: question, sentiment, topic"):
        load_config(None, "data.tasks=[weather]")


def test_channel_parameters_are_validated_by_the_channel():
    with pytest.raises(ConfigError, match=r"channel.snr_db: unknown key; allowed: kind, and for 'ideal': \(none\)"):
        load_config(None, "channel.snr_db=10")


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)


def test_local_task_needs_a_path():
    with pytest.raises(ConfigError, match="needs a 'path'"):
        load_config(None, "data.tasks=[{name: x, source: local}]")


def test_json_round_trip_and_digest():
    cfg = load_config(None, "rounds=4")
    again = config_from_json(cfg.to_json())
    assert again == cfg and again.digest() == cfg.digest()
    assert load_config(None, "rounds=5").digest() != cfg.digest()


def test_keys_added_later_keep_older_runs_cache_keys():
    # digests computed before model.pooling existed (commit aca1313): cached results of those runs stay found
    assert load_config(None, []).digest() == "e33b20c46211"
    assert load_config(None, ["model.head=label_embedding", "peft.method=full"]).digest() == "cac8d31ec0c3"
    assert load_config(None, ["model.pooling=last"]).digest() != "e33b20c46211"


def test_experiment_paths_resolve_against_the_app_folder(tmp_path, monkeypatch):
    from fedllm.apps.server_app import config_from_run_config

    monkeypatch.chdir(tmp_path)  # not the project folder: relative paths fall back to the app folder
    cfg = config_from_run_config({"experiment": "experiments/fedavg_lora.yaml", "overrides": "rounds=2"})
    assert cfg.rounds == 2 and cfg.model.name == "minilm"
    with pytest.raises(ConfigError, match=r"experiment file not found: experiments/nope.yaml .*fedavg_lora.yaml"):
        config_from_run_config({"experiment": "experiments/nope.yaml"})
    assert config_from_run_config({"experiment": "", "overrides": ""}).rounds == 3


def test_mapping_override_replaces_a_section_dotted_override_merges():
    yaml_channel = {"channel": {"kind": "mimo_mac", "jammer": "isotropic"}}
    from fedllm.config import config_from_dict

    merged = config_from_dict(yaml_channel, "channel.jammer_power_db=10")
    assert merged.channel.params() == {"jammer": "isotropic", "jammer_power_db": 10}
    replaced = config_from_dict(yaml_channel, "channel={kind: awgn, snr_db: -20}")
    assert replaced.channel.kind == "awgn" and replaced.channel.params() == {"snr_db": -20}
    with pytest.raises(ConfigError, match=r"channel.jammer: unknown key; allowed: kind, and for 'awgn': snr_db"):
        config_from_dict(yaml_channel, "channel.kind=awgn")


@pytest.mark.parametrize("path", sorted((REPO / "experiments").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_is_valid(path):
    from fedllm.results.sweep import plan

    runs = plan([path])  # validates every point of a sweep: block too
    assert path.read_text().startswith("#"), "each experiment starts with a comment saying what it shows"
    assert runs and all(r.config.rounds >= 1 for r in runs)


def test_lr_grid_may_hold_zero_but_not_negative_scales():
    assert load_config(None, "strategy.lr_grid=[0.0, 0.5, 1.0]").strategy.lr_grid == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match=r"strategy.lr_grid.0: Input should be greater than or equal to 0"):
        load_config(None, "strategy.lr_grid=[-0.1, 1.0]")
