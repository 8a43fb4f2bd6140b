import json

import pytest

from fedllm.config import DataSection, TaskSpec, load_config
from fedllm.core.embedded_tasks import EMBEDDED_TASKS, generate
from fedllm.core.errors import DataError
from fedllm.core.types import Examples
from fedllm.workloads.classification.data import client_examples, load_local_task, load_suite, partition_indices


def test_embedded_tasks_are_deterministic_and_balanced():
    a = generate("sentiment", "train", 400, seed=3)
    assert a == generate("sentiment", "train", 400, seed=3)
    assert a != generate("sentiment", "train", 400, seed=4)
    labels = [y for _, y in a]
    assert 150 < labels.count(1) < 250
    for name, task in EMBEDDED_TASKS.items():
        rows = generate(name, "test", 200)
        assert {y for _, y in rows} == set(range(len(task.labels)))
        assert all(isinstance(t, str) and t for t, _ in rows)


def test_suite_joint_label_space_offsets():
    cfg = load_config(None, "data.tasks=[sentiment,topic,question] data.max_train_per_task=50 data.max_test_per_task=20")
    suite = load_suite(cfg.data, 0)
    assert suite.num_labels == 2 + 4 + 4
    assert suite.label_ranges == [(0, 2), (2, 6), (6, 10)]
    test = suite.split("test")
    assert len(test) == 60
    for label, task in zip(test.labels, test.tasks):
        lo, hi = suite.label_ranges[task]
        assert lo <= label < hi


def _examples(labels: list[int], tasks: list[int] | None = None) -> Examples:
    return Examples([f"t{i}" for i in range(len(labels))], labels, tasks or [0] * len(labels))


def test_iid_partition_is_disjoint_and_complete():
    ex = _examples([i % 3 for i in range(90)])
    parts = partition_indices(ex, 4, "iid", 0.5, seed=0)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(90))
    assert all(20 <= len(p) <= 25 for p in parts)


def test_dirichlet_low_alpha_skews_labels():
    ex = _examples([i % 4 for i in range(800)])
    parts = partition_indices(ex, 4, "dirichlet", 0.1, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(800))
    # With alpha=0.1 most clients are dominated by one label; IID would give ~25% each.
    top_shares = [max([ex.labels[i] for i in p].count(c) for c in range(4)) / len(p) for p in parts if p]
    assert max(top_shares) > 0.6


def test_task_partition_gives_one_task_per_client():
    ex = _examples([0] * 30 + [1] * 30, [0] * 30 + [1] * 30)
    parts = partition_indices(ex, 4, "task", 0.5, seed=0)
    for c, p in enumerate(parts):
        assert {ex.tasks[i] for i in p} == {c % 2}


def test_client_examples_errors_name_the_problem():
    section = DataSection(tasks=[TaskSpec(name="topic")], max_train_per_task=10)
    with pytest.raises(DataError, match="partition-id 5 out of range"):
        client_examples(section, 5, 3, seed=0)
    with pytest.raises(DataError, match="empty partition"):
        client_examples(section, 11, 12, seed=0)


def test_local_jsonl_folder_with_labels(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"x{i}", "label": i % 2}) for i in range(10)))
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "y", "label": 1}) + "\n")
    (tmp_path / "labels.json").write_text('["neg", "pos"]')
    task = load_local_task(TaskSpec(name="mine", source="local", path=str(tmp_path)))
    assert task.labels == ["neg", "pos"] and len(task.train) == 10 and task.test == [("y", 1)]


def test_local_csv_file_with_string_labels_is_split(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,tag\n" + "\n".join(f"s{i},{'ham' if i % 2 else 'spam'}" for i in range(20)))
    task = load_local_task(TaskSpec(name="c", source="local", path=str(path), text_field="sentence", label_field="tag"))
    assert task.labels == ["ham", "spam"]
    assert len(task.train) + len(task.test) == 20 and len(task.test) == 4


def test_local_data_errors(tmp_path):
    with pytest.raises(DataError, match="data path not found"):
        load_local_task(TaskSpec(name="m", source="local", path=str(tmp_path / "missing")))
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 5}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "b", "label": 0}\n')
    (tmp_path / "labels.json").write_text('["a", "b"]')
    with pytest.raises(DataError, match=r"label 5 out of range 0..1"):
        load_local_task(TaskSpec(name="m", source="local", path=str(tmp_path)))
    (tmp_path / "train.jsonl").write_text('{"txt": "a", "label": 0}\n')
    with pytest.raises(DataError, match="lacks field 'text'"):
        load_local_task(TaskSpec(name="m", source="local", path=str(tmp_path)))


def test_real_shared_data_loads(shared_data):
    task = load_local_task(TaskSpec(name="trec", source="local", path=str(shared_data / "trec")))
    assert [name.split()[0] for name in task.labels] == ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]
    assert len(task.train) == 5000 and len(task.test) == 500
    assert {y for _, y in task.train} == set(range(6))


def test_a_partition_is_computed_once_and_read_back_without_flwr_datasets(tmp_path):
    """flwr-datasets draws a Dirichlet partition once; later processes (a deployment starts one per
    message) read the same indices from $FEDLLM_CACHE without importing datasets/flwr-datasets, and a
    different alpha or seed is a different entry, never a stale one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys, json; from fedllm.workloads.classification.data import partition_indices; "
             "from fedllm.core.types import Examples; labels = [i % 4 for i in range(400)]; "
             "ex = Examples([str(i) for i in range(400)], labels, [0] * 400); "
             "parts = partition_indices(ex, 8, 'dirichlet', float(sys.argv[1]), int(sys.argv[2])); "
             "print(json.dumps({'parts': parts, 'datasets': 'datasets' in sys.modules}))")
    env = {**os.environ, "FEDLLM_CACHE": str(tmp_path)}
    repo = Path(__file__).resolve().parents[1]

    def run(alpha: str, seed: str) -> dict:
        out = subprocess.run([sys.executable, "-c", probe, alpha, seed], env=env, cwd=repo, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr[-800:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, again = run("0.3", "1"), run("0.3", "1")
    assert first["datasets"] and not again["datasets"] and first["parts"] == again["parts"]
    assert sorted(i for p in first["parts"] for i in p) == list(range(400))
    other_alpha, other_seed = run("5.0", "1"), run("0.3", "2")
    assert other_alpha["datasets"] and other_alpha["parts"] != first["parts"]
    assert other_seed["datasets"] and other_seed["parts"] != first["parts"]
    assert len(list((tmp_path / "partitions").glob("*.json"))) == 3
