"""Bad input, table-driven: every mistake stops `fedllm run` before training with exit code 2 and a
short message naming the key or the file (and line), no traceback, and no results folder left.

Each case is (id, overrides or a data file to write, the text the message must contain). The runs use
tiny-bert so that the cases that get as far as building the model cost a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedllm.apps.cli import app
from tests.conftest import TINY_OVERRIDES

runner = CliRunner()

# data files of a local task: (train.jsonl, test.jsonl, labels.json); None: leave the file out
GOOD_TRAIN = "".join(json.dumps({"text": f"sample text number {i}", "label": i % 2}) + "\n" for i in range(40))
GOOD_TEST = "".join(json.dumps({"text": f"test text {i}", "label": i % 2}) + "\n" for i in range(10))
GOOD_LABELS = '["neg", "pos"]'

DATA_CASES = [
    ("non-utf8", (GOOD_TRAIN + '{"text": "caf\xe9", "label": 0}\n').encode("latin-1"), GOOD_TEST, GOOD_LABELS,
     "train.jsonl:41: not UTF-8 text"),
    ("not-json", GOOD_TRAIN + "{oops\n", GOOD_TEST, GOOD_LABELS, "train.jsonl:41: not valid JSON"),
    ("json-number", GOOD_TRAIN + "42\n", GOOD_TEST, GOOD_LABELS, "train.jsonl:41: a JSON int where an object"),
    ("json-list", '["a", 1]\n' + GOOD_TRAIN, GOOD_TEST, GOOD_LABELS, "train.jsonl:1: a JSON list where an object"),
    ("missing-field", '{"txt": "x", "label": 0}\n', GOOD_TEST, GOOD_LABELS, "train.jsonl:1: lacks field 'text'"),
    ("null-text", '{"text": null, "label": 0}\n' + GOOD_TRAIN, GOOD_TEST, GOOD_LABELS,
     "train.jsonl:1: field 'text' must be a non-empty string, got None"),
    ("empty-text", '{"text": "  ", "label": 0}\n', GOOD_TEST, GOOD_LABELS, "field 'text' must be a non-empty string"),
    ("null-label", '{"text": "x", "label": null}\n', GOOD_TEST, GOOD_LABELS, "train.jsonl:1: field 'label' must be"),
    ("fractional-label", '{"text": "x", "label": 0.5}\n', GOOD_TEST, GOOD_LABELS, "field 'label' must be"),
    ("label-out-of-range", GOOD_TRAIN + '{"text": "x", "label": 7}\n', GOOD_TEST, GOOD_LABELS,
     "label 7 out of range 0..1"),
    ("unknown-label-name", '{"text": "x", "label": "maybe"}\n', GOOD_TEST, GOOD_LABELS, "unknown label 'maybe'"),
    ("broken-labels-json", GOOD_TRAIN, GOOD_TEST, '["neg", "pos"', "labels.json:1: not valid JSON"),
    ("labels-json-not-a-list", GOOD_TRAIN, GOOD_TEST, '{"0": "neg"}', "labels.json: should be a JSON list"),
    ("repeated-label-names", GOOD_TRAIN, GOOD_TEST, '["a", "a"]', "labels.json: label names repeat"),
    ("empty-test", GOOD_TRAIN, "", GOOD_LABELS, "no test rows"),
    ("empty-train", "", GOOD_TEST, GOOD_LABELS, "no training rows"),
    ("blank-lines-only", "\n\n", GOOD_TEST, GOOD_LABELS, "no training rows"),
    ("no-test-file", GOOD_TRAIN, None, GOOD_LABELS, "no test.jsonl or test.csv"),
]

CONFIG_CASES = [
    ("unknown-section", ["strategies.x=1"], "strategies: unknown key; allowed: model, peft"),
    ("unknown-key", ["client.lrate=0.1"], "client.lrate: unknown key; allowed: trainer, lr"),
    ("wrong-type", ["rounds=abc"], "rounds: Input should be a valid integer"),
    ("negative-lr", ["client.lr=-1"], "client.lr: Input should be greater than 0"),
    ("fraction-above-one", ["strategy.fraction_train=1.5"], "strategy.fraction_train"),
    ("unknown-strategy", ["strategy.name=fedavgg"], "strategy.name: unknown strategy 'fedavgg'; allowed:"),
    ("unknown-channel", ["channel.kind=wifi"], "channel.kind: unknown channel 'wifi'; allowed:"),
    ("unknown-channel-key", ["channel.kind=awgn", "channel.jammer=1"], "channel.jammer: unknown key"),
    ("bad-rule-parameter", ["strategy.name=ties", "strategy.k=2"], "strategy.k: Input should be less than or equal"),
    ("unknown-trainer", ["client.trainer=ppo"], "unknown client trainer 'ppo'"),
    ("unknown-embedded-task", ["data.tasks=[weather]"], "unknown embedded task 'weather'"),
    ("override-without-equals", ["rounds"], "override 'rounds' is not of the form key=value"),
    ("override-bad-yaml", ["rounds=[1"], "override rounds: cannot parse value"),
    ("huge-seed", ["seed=99999999999999999999999"], "seed: Input should be less than or equal to 4294967295"),
    ("negative-seed", ["seed=-3"], "seed: Input should be greater than or equal to 0"),
    ("dp-with-median", ["strategy.name=median", "strategy.dp_clip_norm=1"], "only goes with fedavg or personalized"),
    ("dp-over-the-air", ["strategy.dp_clip_norm=1", "channel.kind=ota"], "channel 'ota' superposes"),
    ("dp-sampled-without-poisson", ["strategy.dp_clip_norm=1", "strategy.fraction_train=0.5"],
     "needs strategy.sampling: poisson"),
    ("budget-without-dp", ["strategy.dp_target_epsilon=2"], "dp_target_epsilon is a privacy budget"),
    ("rmtllmf-nothing-frozen", ["strategy.name=rmtllmf"], "set peft.frozen_patterns"),
    ("personalized-nothing-personal", ["strategy.name=personalized"], "keeps a personal part on every client"),
    ("local-only-sends", ["strategy.name=local_only"], "strategy 'local_only' goes with an empty peft.global_patterns"),
    ("rl-section-without-trainer", ["rl={}"], "client.trainer 'rl' and an 'rl:' section go together"),
    ("quantize-too-many-bits", ["channel.kind=quantize", "channel.bits=32"], "channel.bits"),
    ("unknown-tracker", ["output.tracking=wandb"], "output.tracking"),
    ("weight-delta-without-lora", ["peft.fuse_lora_as=weight_delta"], "peft.fuse_lora_as 'weight_delta' merges"),
    ("running-sum-with-median", ["strategy.running_sum=true", "strategy.reject_norm_ratio=null", "strategy.name=median"],
     "strategy.running_sum: strategy 'median' needs every reply at once"),
]

MODEL_CASES = [
    ("unknown-model", ["model.name=/no/such/model"], "model.name '/no/such/model': cannot load it offline"),
    ("lora-targets-match-nothing", ["peft.method=lora", "peft.target_modules=[q_proj]", "peft.global_patterns=[lora_, classifier]"],
     "peft.target_modules ['q_proj'] match no linear layer of this 'bert' model; its linear layers:"),
    ("adapter-targets-match-nothing", ["peft.adapter_size=4", "peft.adapter_targets=[o_proj]"],
     "peft.adapter_targets ['o_proj'] match no linear layer"),
    ("max-length-beyond-positions", ["model.max_length=256"], "model.max_length 256 is longer than 'tiny-bert' can read (128"),
    ("trainable-tensor-in-no-group", ["peft.global_patterns=[encoder]"], "matches neither peft.global_patterns"),
    ("more-clients-than-examples", ["data.max_train_per_task=20"], "cannot fill 30 clients"),
]


def _run(experiment: Path, overrides: list[str], clients: int = 2) -> tuple[int, str]:
    args = ["run", str(experiment), "--clients", str(clients)]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def _assert_clean_failure(code: int, output: str, expected: str, results: Path) -> None:
    assert code == 2, output
    assert expected in " ".join(output.split()), output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 2, output
    assert not list(results.rglob("config.yaml")) and not list(results.rglob("*.tmp")), "a results folder was left"


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text("{}\n")
    return path


@pytest.mark.parametrize("case, overrides, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_stops_before_training(case, overrides, expected, experiment, tmp_path):
    results = tmp_path / "results"
    code, output = _run(experiment, [*TINY_OVERRIDES, f"output.dir={results}", *overrides])
    _assert_clean_failure(code, output, expected, results)


@pytest.mark.parametrize("case, train, test, labels, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_stops_before_training_and_names_the_file(case, train, test, labels, expected, experiment, tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    for name, content in (("train.jsonl", train), ("test.jsonl", test), ("labels.json", labels)):
        if content is not None:
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    results = tmp_path / "results"
    code, output = _run(experiment, [*TINY_OVERRIDES, f"output.dir={results}", "data.validation_per_task=0",
                                     f"data.tasks=[{{name: mine, source: local, path: {folder}}}]"])
    _assert_clean_failure(code, output, expected, results)


@pytest.mark.parametrize("case, overrides, expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_a_model_or_peft_mistake_stops_before_training(case, overrides, expected, experiment, tmp_path):
    results = tmp_path / "results"
    clients = 30 if case == "more-clients-than-examples" else 2
    code, output = _run(experiment, [*TINY_OVERRIDES, f"output.dir={results}", *overrides], clients)
    _assert_clean_failure(code, output, expected, results)


def test_files_that_are_not_experiments(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("rounds: [1, 2\n")
    code, output = _run(broken, [])
    assert code == 2 and "broken.yaml:2:1 is not valid YAML" in output and "Traceback" not in output
    listed = tmp_path / "list.yaml"
    listed.write_text("- rounds: 1\n")
    code, output = _run(listed, [])
    assert code == 2 and "must hold a mapping of sections, got list" in output
    code, output = _run(Path(__file__).resolve().parents[1] / "experiments" / "pftt" / "pftt_dirichlet.yaml", [])
    assert code == 2 and "is a sweep (data.alpha over [0.1, 0.5, 10.0]): pick one point with --set data.alpha=0.1" \
        in " ".join(output.split())


@pytest.mark.parametrize("where", ["a-file", "proc"])
def test_an_unusable_results_folder_stops_before_the_model_is_built(where, experiment, tmp_path):
    target = tmp_path / "taken"
    target.write_text("a file, not a folder")
    folder = target if where == "a-file" else Path("/proc/fedllm-results")
    code, output = _run(experiment, [*TINY_OVERRIDES, f"output.dir={folder}"])
    assert code == 2 and f"output.dir '{folder}': cannot write results there" in " ".join(output.split()), output
    assert "Traceback" not in output


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    from fedllm.config import TaskSpec
    from fedllm.workloads.classification.data import load_local_task

    rows = "text,label\n" + "fine day,pos\nbad day,neg\n" * 3
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "train.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    (tmp_path / "bom" / "test.csv").write_text(rows)
    task = load_local_task(TaskSpec(name="bom", source="local", path=str(tmp_path / "bom")))
    assert task.labels == ["neg", "pos"] and task.train[0] == ("fine day", 1)


def test_a_huge_text_costs_no_more_than_its_first_tokens(tmp_path):
    """The texts are cut before tokenisation: a 10 MB text gives the same logits as its first 2k characters."""
    import torch

    from fedllm.config import load_config
    from fedllm.core.bundle import forward_logits
    from fedllm.workloads import workload_for

    workload = workload_for(load_config(None, TINY_OVERRIDES))
    bundle = workload.build_model()
    bundle.model.eval()  # no dropout: the two forward passes must be comparable
    huge = "word " * 2_000_000
    calls = []
    tokenizer = bundle.tokenizer
    bundle.tokenizer = lambda texts, **kw: calls.append(max(map(len, texts))) or tokenizer(texts, **kw)
    with torch.no_grad():
        a = forward_logits(bundle, bundle.model, [huge], [0], workload.suite.label_ranges, 32)
        b = forward_logits(bundle, bundle.model, [huge[:2000]], [0], workload.suite.label_ranges, 32)
    assert torch.equal(a, b) and calls[0] <= 32 * 32


@pytest.mark.slow
def test_under_flwr_run_more_supernodes_than_examples_fail_before_a_results_folder(tmp_path):
    """As `flwr run` does it: the ServerApp reads the number of partitions from the nodes' own config."""
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.config import load_config
    from fedllm.core.errors import DataError

    cfg = load_config(None, [*TINY_OVERRIDES, "data.max_train_per_task=10", f"output.dir={tmp_path / 'results'}"])
    failed = []
    run_simulation(server_app=make_server_app(cfg, on_error=failed.append), client_app=client_app, num_supernodes=12,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    assert len(failed) == 1 and isinstance(failed[0], DataError) and "cannot fill 12 clients" in str(failed[0])
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("config.yaml"))
