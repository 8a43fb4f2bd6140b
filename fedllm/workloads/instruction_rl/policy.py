"""Causal language-model policies for RL instruction tuning (PFIT): build, instruction-tune, generate.

``tiny-gpt2`` is the embedded default: a two-layer GPT-2 built from a config with a word-level
tokenizer over the embedded instruction vocabulary, given a short supervised instruction-tuning
stage on the embedded instructions (every answer style) so RL starts from a policy that already
answers; it is made once and cached on disk (``$FEDLLM_CACHE`` or ``~/.cache/fedllm``), written
atomically, so the server and every client load bit-identical weights. Anything else is a
Hugging Face id or local folder of a causal LM (used as it is: an instruct model needs no
supervised stage). LoRA comes from PEFT, with the same parameter groups as the classifiers.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from fedllm.config import ExperimentConfig
from fedllm.core.accelerator import autocast, check_precision, pick_device, prepare_quantized, quantized_loading
from fedllm.core.bundle import BundleCache, ModelBundle, assemble_bundle
from fedllm.core.errors import ConfigError
from fedllm.core.model_store import resolve_model
from fedllm.core.store import cache_root
from fedllm.core.types import Instruction
from fedllm.workloads.instruction_rl.instructions import embedded_instructions, embedded_vocabulary, load_instructions
from fedllm.workloads.peft import wrap_peft

TINY_GPT2 = "tiny-gpt2"
SPECIAL = ["<pad>", "<eos>", "<unk>"]
SFT_VERSION = 2  # bump when the embedded data or the recipe changes: a new cache entry


def word_tokenizer(vocab: list[str]):
    """A whitespace word-level tokenizer (fast, offline) that decodes with spaces between words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(SPECIAL + [w for w in vocab if w not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_gpt2(vocab_size: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=96, n_embd=96, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(config)


def supervised_tune(model: torch.nn.Module, tokenizer, items: list[Instruction], steps: int, lr: float,
                    seed: int, batch_size: int = 32) -> list[float]:
    """Next-token cross-entropy on (prompt, demonstration) pairs, the loss on the response only."""
    rng = random.Random(seed)
    pairs = [(it.prompt, r) for it in items for r in it.responses]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        input_ids, labels = [], []
        for prompt, response in batch:
            p = tokenizer(prompt)["input_ids"]
            full = tokenizer(f"{prompt} {response}")["input_ids"] + [tokenizer.eos_token_id]
            input_ids.append(full)
            labels.append([-100] * len(p) + full[len(p):])
        width = max(map(len, input_ids))
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in input_ids])
        lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=lab).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    return losses


def _tiny_reference(cfg: ExperimentConfig):
    """The instruction-tuned tiny policy, from the disk cache or made now (and cached)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    rl = cfg.rl
    assert rl is not None
    key = hashlib.sha256(json.dumps([SFT_VERSION, rl.sft_steps, rl.sft_lr, cfg.seed]).encode()).hexdigest()[:12]
    folder = cache_root() / "policies" / f"{TINY_GPT2}-{key}"
    if not (folder / "done").is_file():
        tokenizer = word_tokenizer(embedded_vocabulary())
        model = tiny_gpt2(len(tokenizer), cfg.seed)
        train, test = embedded_instructions(cfg.seed)
        # Both splits: the facts are the policy's "pretrained knowledge"; RL trains on the train
        # prompts and is evaluated on the test prompts (disjoint questions it can already answer).
        losses = supervised_tune(model, tokenizer, train + test, rl.sft_steps, rl.sft_lr, cfg.seed)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "done").write_text(json.dumps({"sft_steps": rl.sft_steps, "final_loss": losses[-1] if losses else None}))
        try:
            tmp.rename(folder)
        except OSError:  # another process made it first: theirs is identical (seeded, same recipe)
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return model, tokenizer


def reference_policy(cfg: ExperimentConfig):
    """(model, tokenizer) of the policy every client starts from (also the KL reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loading = quantized_loading(cfg.model.quantization, cfg.model.precision)
    if cfg.model.name == TINY_GPT2:
        if loading:
            raise ConfigError(f"model.quantization: {TINY_GPT2} is made here in float32; use a pretrained causal LM "
                              "(e.g. smollm2-135m) or model.quantization: none")
        model, tokenizer = _tiny_reference(cfg)
    else:
        source = resolve_model(cfg.model.name)  # embedded (smollm2-135m) and .gguf models: a cached folder
        try:
            model = prepare_quantized(AutoModelForCausalLM.from_pretrained(source, **loading), cfg.model.quantization)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise ConfigError(f"model.name {cfg.model.name!r}: cannot load a causal LM offline ({exc}); use "
                             f"'{TINY_GPT2}', 'smollm2-135m', a .gguf file, a local folder with config.json + "
                             "weights + tokenizer, or a Hugging Face id with the hub reachable") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues the prompt
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def build_policy(cfg: ExperimentConfig) -> ModelBundle:
    device = pick_device()
    check_precision(cfg.model.precision, device)
    base, tokenizer = reference_policy(cfg)
    torch.manual_seed(cfg.seed)
    return assemble_bundle(wrap_peft(base, cfg, cfg.seed, causal_lm=True), tokenizer, cfg.peft.global_patterns,
                           cfg.peft.local_patterns, device, cfg.model.precision,
                           placed=cfg.model.quantization != "none")


_CACHE = BundleCache()


def cached_policy(cfg: ExperimentConfig) -> ModelBundle:
    """One policy per worker process and model-defining config (every trainable tensor is
    overwritten from the message or the client's state before use)."""
    assert cfg.rl is not None
    key = "|".join([cfg.model.model_dump_json(), cfg.peft.model_dump_json(), str(cfg.rl.sft_steps),
                    str(cfg.rl.sft_lr), str(cfg.seed)])
    return _CACHE.get(key, lambda: build_policy(cfg))


@torch.no_grad()
def generate(bundle: ModelBundle, prompts: list[str], max_new_tokens: int, sample: bool = False,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """Completions of ``prompts`` (greedy by default: evaluation; sampled and seeded otherwise)."""
    model, tokenizer = bundle.model, bundle.tokenizer
    model.eval()
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(bundle.device)
        with autocast(bundle.precision, bundle.device):
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_k=0 if sample else None,
                                 top_p=1.0 if sample else None)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in out]


@torch.no_grad()
def kl_to_reference(bundle: ModelBundle, prompts: list[str], completions: list[str]) -> float:
    """Mean over sequences of sum_t [log pi(y_t) - log pi_ref(y_t)] on the given completions
    (a Monte-Carlo KL(pi || pi_ref) estimate when they are sampled from pi); the reference is
    the policy with its LoRA switched off. Right padding, so positions match an unpadded pass."""
    model, tokenizer = bundle.model, bundle.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    joiner = "" if getattr(tokenizer, "chat_template", None) else " "  # a chat prompt ends by opening the answer
    try:
        enc = tokenizer([f"{p}{joiner}{c}" for p, c in zip(prompts, completions)], return_tensors="pt",
                        padding=True).to(bundle.device)
    finally:
        tokenizer.padding_side = side
    mask = enc["attention_mask"][:, 1:].clone().float()
    for i, prompt in enumerate(prompts):  # score only the completion tokens
        mask[i, : len(tokenizer(prompt)["input_ids"]) - 1] = 0

    def token_logps() -> torch.Tensor:
        logits = model(**enc).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]

    model.eval()
    policy = token_logps()
    with model.disable_adapter():
        ref = token_logps()
    return float(((policy - ref) * mask).sum(-1).mean())


def render_prompts(items: list[Instruction], tokenizer) -> list[Instruction]:
    """Prompts as the policy reads them: a chat model's own template around the bare question (one
    user turn, the assistant's turn opened); a policy without a chat template reads them as written."""
    if getattr(tokenizer, "chat_template", None) is None:
        return items
    return [replace(it, prompt=tokenizer.apply_chat_template([{"role": "user", "content": it.question or it.prompt}],
                                                             tokenize=False, add_generation_prompt=True))
            for it in items]


def prompts_for(cfg: ExperimentConfig, split: str) -> list[Instruction]:
    """The run's training or test prompts (capped by rl.max_train_prompts / rl.max_test_prompts)."""
    assert cfg.rl is not None
    train, test = load_instructions(cfg.rl.prompts, cfg.seed)
    if split == "train":
        return train[: cfg.rl.max_train_prompts] if cfg.rl.max_train_prompts else train
    return test[: cfg.rl.max_test_prompts]
