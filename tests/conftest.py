"""Shared fixtures: offline mode, tiny configs, and the real data folder when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.jsonl").is_file():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA


# A fast experiment: tiny-bert (2 layers, random init) fully fine-tuned on the embedded
# topic task; it goes from chance to well above it in a few dozen steps.
TINY_OVERRIDES = [
    "model.name=tiny-bert", "model.max_length=32", "peft.method=full", "peft.global_patterns=['*']",
    "data.tasks=[topic]", "data.max_train_per_task=600", "data.max_test_per_task=200",
    "client.lr=0.003", "client.max_steps=30", "client.batch_size=16", "rounds=2",
]


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return [*TINY_OVERRIDES, f"output.dir={tmp_path / 'results'}"]
