"""Tasks, loading and partitioning into clients.

A task is a list of (text, label) pairs plus its label names. Several tasks share one
joint label space (each task's labels get an offset), so one classification head serves
a multi-task run. Sources: the embedded generated tasks (default, offline), a local JSONL
or CSV file or a folder with ``train``/``test`` files and optional ``labels.json`` (the
format of ../shared/data), or a Hugging Face dataset name via ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fedllm.config import DataSection, TaskSpec
from fedllm.core.embedded_tasks import EMBEDDED_TASKS, generate
from fedllm.core.errors import DataError
from fedllm.core.store import cache_root, write_atomically
from fedllm.core.types import Examples


@dataclass
class TaskData:
    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    validation: list[tuple[str, int]] = field(default_factory=list)  # carved from train, server-side


@dataclass
class TaskSuite:
    """All tasks of a run with their label offsets in the joint label space."""

    tasks: list[TaskData]

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for t in self.tasks:
            out.append(total)
            total += len(t.labels)
        return out

    @property
    def label_ranges(self) -> list[tuple[int, int]]:
        return [(off, off + len(t.labels)) for off, t in zip(self.offsets, self.tasks)]

    @property
    def label_names(self) -> list[str]:
        return [label for t in self.tasks for label in t.labels]

    @property
    def num_labels(self) -> int:
        return sum(len(t.labels) for t in self.tasks)

    def split(self, which: str) -> Examples:
        ex = Examples()
        for k, (task, off) in enumerate(zip(self.tasks, self.offsets)):
            for text, label in getattr(task, which):
                ex.texts.append(text)
                ex.labels.append(label + off)
                ex.tasks.append(k)
        return ex


# --------------------------------------------------------------------------- loaders


def read_text_file(path: Path) -> str:
    """A data file's text: UTF-8 (a byte-order mark is dropped); bytes that are not UTF-8 are an error
    naming the file and the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None


def _records(path: Path) -> list[tuple[int, object]]:
    """(line number, record) of a JSONL or CSV file."""
    text = read_text_file(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return [(reader.line_num, row) for row in reader]
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    if path.suffix in (".jsonl", ".json"):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        return records
    raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use .jsonl or .csv)")


def _read_rows(path: Path, text_field: str, label_field: str) -> list[tuple[str, object]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows: list[tuple[str, object]] = []
    for n, rec in _records(path):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: a JSON {type(rec).__name__} where an object with {text_field!r} and "
                            f"{label_field!r} belongs")
        if text_field not in rec or label_field not in rec:
            raise DataError(f"{path}:{n}: lacks field {text_field!r} or {label_field!r} (has {sorted(rec)})")
        text, label = rec[text_field], rec[label_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{n}: field {text_field!r} must be a non-empty string, got {text!r}")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if label is None or isinstance(label, (bool, list, dict, float)) or (isinstance(label, str) and not label):
            raise DataError(f"{path}:{n}: field {label_field!r} must be a label name or index, got {label!r}")
        rows.append((text, label))
    return rows


def _read_label_names(path: Path) -> list[str]:
    try:
        names = json.loads(read_text_file(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); it should list the label names") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: should be a JSON list of label names, e.g. [\"negative\", \"positive\"]")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: label names repeat ({names})")
    return names


def _find_split(folder: Path, split: str) -> Path:
    for suffix in (".jsonl", ".csv"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(f"no {split}.jsonl or {split}.csv in {folder}")


def _to_int_labels(rows: list[tuple[str, object]], names: list[str] | None, where: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Map labels to ints: ints stay (checked against ``names``), strings are looked up."""
    if names is None:
        if all(isinstance(lab, int) for _, lab in rows):
            names = [str(i) for i in range(max(int(lab) for _, lab in rows) + 1)]  # type: ignore[arg-type]
        else:
            names = sorted({str(lab) for _, lab in rows})
    index = {n: i for i, n in enumerate(names)}
    out = []
    for text, lab in rows:
        if isinstance(lab, int) or (isinstance(lab, str) and lab.isdigit() and lab not in index):
            i = int(lab)
            if not 0 <= i < len(names):
                raise DataError(f"{where}: label {i} out of range 0..{len(names) - 1} for labels {names}")
        elif str(lab) in index:
            i = index[str(lab)]
        else:
            raise DataError(f"{where}: unknown label {lab!r}; known: {names}")
        out.append((text, i))
    return out, names


def load_local_task(spec: TaskSpec) -> TaskData:
    path = Path(spec.path or "").expanduser()
    if path.is_dir():
        train_rows = _read_rows(_find_split(path, "train"), spec.text_field, spec.label_field)
        test_rows = _read_rows(_find_split(path, "test"), spec.text_field, spec.label_field)
        labels_file = path / "labels.json"
        names = _read_label_names(labels_file) if labels_file.is_file() else None
    elif path.is_file():
        rows = _read_rows(path, spec.text_field, spec.label_field)
        random.Random(f"fedllm-split-{spec.name}").shuffle(rows)
        cut = max(1, len(rows) // 5)
        test_rows, train_rows, names = rows[:cut], rows[cut:], None
    else:
        raise DataError(f"task {spec.name!r}: data path not found: {path}")
    if not train_rows:
        raise DataError(f"task {spec.name!r}: no training rows in {path}")
    if not test_rows:
        raise DataError(f"task {spec.name!r}: no test rows in {path} (the server scores the global model on them)")
    if names is None:
        _, names = _to_int_labels(train_rows + test_rows, None, str(path))
    train, names = _to_int_labels(train_rows, names, f"{path} (train)")
    test, _ = _to_int_labels(test_rows, names, f"{path} (test)")
    return TaskData(spec.name, list(names), train, test)


def load_hf_task(spec: TaskSpec) -> TaskData:
    """Real loading code for ``datasets`` names (needs the hub or a local datasets cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.path)
    except Exception as exc:  # network, missing config, etc.
        raise DataError(f"task {spec.name!r}: cannot load dataset {spec.path!r}: {exc}") from None
    test_split = "test" if "test" in ds else "validation"
    feature = ds["train"].features.get(spec.label_field)
    names = list(getattr(feature, "names", []) or []) or None
    train_rows = list(zip(ds["train"][spec.text_field], ds["train"][spec.label_field]))
    test_rows = list(zip(ds[test_split][spec.text_field], ds[test_split][spec.label_field]))
    if names is None:
        _, names = _to_int_labels(train_rows + test_rows, None, spec.path or "")
    train, names = _to_int_labels(train_rows, names, f"{spec.path} (train)")
    test, _ = _to_int_labels(test_rows, names, f"{spec.path} ({test_split})")
    return TaskData(spec.name, names, train, test)


def _cap(rows: list[tuple[str, int]], n: int | None, tag: str) -> list[tuple[str, int]]:
    if n is None or len(rows) <= n:
        return rows
    keep = sorted(random.Random(tag).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def load_task(spec: TaskSpec, section: DataSection, seed: int) -> TaskData:
    if spec.source == "embedded":
        emb = EMBEDDED_TASKS[spec.name]
        task = TaskData(spec.name, list(emb.labels),
                        generate(spec.name, "train", section.max_train_per_task or 2000, seed),
                        generate(spec.name, "test", section.max_test_per_task or 400, seed))
    elif spec.source == "local":
        task = load_local_task(spec)
    else:
        task = load_hf_task(spec)
    task.train = _cap(task.train, section.max_train_per_task, f"{spec.name}-train-{seed}")
    task.test = _cap(task.test, section.max_test_per_task, f"{spec.name}-test-{seed}")
    n_val = min(section.validation_per_task, len(task.train) // 5)
    val_idx = set(random.Random(f"{spec.name}-validation-{seed}").sample(range(len(task.train)), n_val))
    task.validation = [row for i, row in enumerate(task.train) if i in val_idx]
    task.train = [row for i, row in enumerate(task.train) if i not in val_idx]
    return task


@lru_cache(maxsize=4)
def _load_suite_cached(section_json: str, seed: int) -> TaskSuite:
    section = DataSection.model_validate_json(section_json)
    return TaskSuite([load_task(spec, section, seed) for spec in section.tasks])


def load_suite(section: DataSection, seed: int) -> TaskSuite:
    """Load every task of a run (cached per process: clients of one worker share it)."""
    return _load_suite_cached(section.model_dump_json(), seed)


# --------------------------------------------------------------------------- partitioning


def partition_indices(examples: Examples, num_clients: int, scheme: str, alpha: float, seed: int) -> list[list[int]]:
    """Split example indices among clients: ``iid``, ``dirichlet`` label skew, or ``task`` (one task per client)."""
    if num_clients < 1:
        raise DataError("num_clients must be at least 1")
    n = len(examples)
    if n < num_clients:
        raise DataError(f"{n} examples cannot fill {num_clients} clients: some would get an empty partition; "
                        "use fewer clients or more data")
    if scheme == "task":
        task_ids = sorted(set(examples.tasks))
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for t in task_ids:
            owners = [c for c in range(num_clients) if c % len(task_ids) == t] or [t % num_clients]
            idx = [i for i in range(n) if examples.tasks[i] == t]
            random.Random(f"{seed}-task-{t}").shuffle(idx)
            for j, i in enumerate(idx):
                parts[owners[j % len(owners)]].append(i)
        return [sorted(p) for p in parts]
    key = _partition_key(examples.labels, num_clients, scheme, alpha, seed)
    cached = _cached_partition(key)
    if cached is not None:
        return cached
    parts = _flower_partitions(examples.labels, num_clients, scheme, alpha, seed)
    _keep_partition(key, parts)
    return parts


def _partition_key(labels: list[int], num_clients: int, scheme: str, alpha: float, seed: int) -> str:
    """What decides a partition, flwr-datasets' version included (its partitioners draw it)."""
    from importlib.metadata import version

    spec = [labels, num_clients, scheme, alpha if scheme == "dirichlet" else None, seed, version("flwr-datasets")]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:24]


def _cached_partition(key: str) -> list[list[int]] | None:
    """A partition computed before, from ``$FEDLLM_CACHE/partitions``: a deployment starts a client
    process per message, and flwr-datasets' import (datasets, pyarrow) alone takes about 2 s of it."""
    path = cache_root() / "partitions" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not there (or unreadable): compute it
        return None


def _keep_partition(key: str, parts: list[list[int]]) -> None:
    folder = cache_root() / "partitions"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(parts)))
    except OSError:  # a read-only cache costs time, not the run
        pass


def _flower_partitions(labels: list[int], num_clients: int, scheme: str, alpha: float, seed: int) -> list[list[int]]:
    """``iid`` or ``dirichlet`` label skew by flwr-datasets' partitioners."""
    n = len(labels)
    from datasets import Dataset

    ds = Dataset.from_dict({"label": labels, "idx": list(range(n))})
    if scheme == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        partitioner = IidPartitioner(num_partitions=num_clients)
        ds = ds.shuffle(seed=seed)
    else:
        from flwr_datasets.partitioner import DirichletPartitioner

        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha,
            min_partition_size=1, self_balancing=False, seed=seed,
        )
    partitioner.dataset = ds
    with warnings.catch_warnings():  # flwr-datasets warns on every resampling; its final error says it all
        warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
        try:
            return [sorted(partitioner.load_partition(c)["idx"]) for c in range(num_clients)]
        except ValueError as exc:
            raise DataError(
                f"data: Dirichlet(alpha={alpha}) over {n} examples leaves some of {num_clients} clients empty "
                f"even after resampling ({exc}); use fewer clients (data.num_clients), more data "
                "(data.max_train_per_task) or a larger data.alpha") from None


@lru_cache(maxsize=8)
def _partitions(section_json: str, split: str, num_partitions: int, seed: int) -> tuple[Examples, list[list[int]]]:
    section = DataSection.model_validate_json(section_json)
    examples = load_suite(section, seed).split(split)
    return examples, partition_indices(examples, num_partitions, section.partition, section.alpha, seed)


def client_examples(section: DataSection, partition_id: int, num_partitions: int, seed: int,
                    split: str = "train") -> Examples:
    """One client's examples of ``split`` (partitions cached per process).

    The test split is partitioned with the same scheme and seed as the train split, so under
    Dirichlet label skew a client's test examples follow its own label mix (personalised
    evaluation), as the partitioner draws the per-class proportions from the seed."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    train, parts = _partitions(section.model_dump_json(), split, num_partitions, seed)
    mine = parts[partition_id]
    if not mine:
        raise DataError(
            f"client {partition_id} got an empty {split} partition ({section.partition}, {num_partitions} clients); "
            "use fewer clients, more data or a larger alpha"
        )
    return train.subset(mine)


def check_partitions(section: DataSection, num_partitions: int, seed: int) -> None:
    """Fail before any training (and before a results folder exists) when some client's training
    partition would be empty: one clear error instead of every round failing on that client."""
    _, parts = _partitions(section.model_dump_json(), "train", num_partitions, seed)
    empty = [c for c, p in enumerate(parts) if not p]
    if empty:
        raise DataError(
            f"data: {len(empty)} of {num_partitions} clients get an empty train partition (clients {empty[:10]}) "
            f"under partition={section.partition}" + (f" alpha={section.alpha}" if section.partition == "dirichlet" else "")
            + "; use fewer clients (data.num_clients), more data (data.max_train_per_task) or a larger data.alpha")


def local_examples(suite: TaskSuite, path: str, task: str | None = None) -> Examples:
    """A device's own training data (a JSONL/CSV file or a folder with ``train.*``) for one task of
    the run, with labels mapped into the run's joint label space; used instead of a partition."""
    names = [t.name for t in suite.tasks]
    k = names.index(task) if task in names else 0
    if task is not None and task not in names:
        raise DataError(f"node config task={task!r} is not a task of this run ({', '.join(names)})")
    p = Path(path).expanduser()
    file = _find_split(p, "train") if p.is_dir() else p
    own = suite.tasks[k]
    rows, _ = _to_int_labels(_read_rows(file, "text", "label"), own.labels, str(file))
    if not rows:
        raise DataError(f"{file}: no training rows")
    offset = suite.offsets[k]
    return Examples([t for t, _ in rows], [y + offset for _, y in rows], [k] * len(rows))
