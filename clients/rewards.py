"""Reward functions for RL instruction tuning (PFIT), by name, and the per-client mix.

A reward scores a batch of completions: ``reward(prompts, completions, references) -> list[float]``.
Three families, all offline:

- rule rewards: ``length`` (closeness to a target word count), ``exact_answer`` (the reference
  answer appears in the completion), ``format`` (a regular expression matches);
- embedded scorers on the MiniLM sentence encoder that ships with the package: ``similarity``
  (cosine similarity to the reference answer, a helpfulness proxy) and ``tone`` (closer to
  friendly than to rude anchor sentences, a harmlessness/politeness proxy);
- ``reward_model``: a sequence-classification reward model from a Hugging Face id or a local
  folder, scoring "prompt + completion" by the logit of one label.

Each client prefers a weighted mix of the named rewards. For training, each reward is
z-scored over the batch before mixing (:func:`normalise_batch`), so a reward with a small
spread (e.g. cosine similarities within 0.1 of each other) still steers the policy by its
weight rather than by its units. For evaluation, the mix is taken of the raw rewards, each
already on a comparable 0..1-ish scale, so numbers are comparable across policies and rounds
(a z-score would make every policy's mean zero).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from fedllm.core.encoders import sentence_embeddings
from fedllm.core.registry import Registry, validate_params

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]


class RewardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


REWARDS: Registry[tuple[type[RewardParams], Callable[[Any], RewardFn]]] = Registry("reward")


def register(name: str, params: type[RewardParams] = RewardParams):
    def decorator(factory: Callable[[Any], RewardFn]) -> Callable[[Any], RewardFn]:
        REWARDS.register(name)((params, factory))
        return factory

    return decorator


def validate_reward(name: str, spec: Mapping[str, Any]) -> None:
    """Check a ``rl.rewards.<name>`` entry: a known ``kind`` and that kind's own keys."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind is None:
        raise ValueError(f"rl.rewards.{name}: needs a 'kind'; allowed: {', '.join(REWARDS.names())}")
    params_model, _ = REWARDS.get(str(kind))
    validate_params(params_model, spec, f"rl.rewards.{name}", str(kind))


def build_reward(spec: Mapping[str, Any]) -> RewardFn:
    spec = dict(spec)
    params_model, factory = REWARDS.get(str(spec.pop("kind")))
    return factory(params_model(**spec))


_BUILT: dict[str, dict[str, RewardFn]] = {}


def build_rewards(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, RewardFn]:
    """Every named reward of ``rl.rewards``, built once per process (a reward model loads weights,
    the tone scorer embeds its anchors): training and evaluation rounds reuse them."""
    key = repr(sorted((name, sorted(spec.items())) for name, spec in specs.items()))
    if key not in _BUILT:
        _BUILT[key] = {name: build_reward(spec) for name, spec in specs.items()}
    return _BUILT[key]


def _words(text: str) -> list[str]:
    return text.split()


def _content_words(text: str) -> set[str]:
    """Lower-cased words without punctuation ("Paris." and "paris" are the same answer)."""
    return set(re.findall(r"[\w']+", text.lower()))


# --------------------------------------------------------------------------- rule rewards


class LengthParams(RewardParams):
    target: PositiveInt = Field(3, description="preferred number of words")


@register("length", LengthParams)
def length_reward(p: LengthParams) -> RewardFn:
    """1 at the target word count, falling linearly to 0 at twice the target (or at 0 words)."""

    def score(prompts, completions, references) -> list[float]:
        return [max(0.0, 1.0 - abs(len(_words(c)) - p.target) / p.target) for c in completions]

    return score


@register("exact_answer")
def exact_answer_reward(_: RewardParams) -> RewardFn:
    """1 when every word of the reference answer appears in the completion, else 0."""

    def score(prompts, completions, references) -> list[float]:
        return [float(bool(_content_words(r)) and _content_words(r) <= _content_words(c))
                for c, r in zip(completions, references)]

    return score


class FormatParams(RewardParams):
    pattern: str = Field(..., description="a regular expression the completion should match (re.search)")


@register("format", FormatParams)
def format_reward(p: FormatParams) -> RewardFn:
    try:
        regex = re.compile(p.pattern)
    except re.error as exc:
        raise ValueError(f"format reward: pattern {p.pattern!r} is not a valid regular expression ({exc})") from None

    def score(prompts, completions, references) -> list[float]:
        return [float(regex.search(c) is not None) for c in completions]

    return score


# --------------------------------------------------------------------------- embedded scorers


@register("similarity")
def similarity_reward(_: RewardParams) -> RewardFn:
    """Cosine similarity of the completion to the reference answer (helpfulness proxy), in [-1, 1]."""

    def score(prompts, completions, references) -> list[float]:
        a, b = sentence_embeddings(completions), sentence_embeddings(references)
        return (a * b).sum(-1).tolist()

    return score


FRIENDLY = ["thank you, I am glad to help.", "I hope this helps, have a wonderful day!",
            "happy to help, kind regards.", "that is a great question, here is the answer."]
RUDE = ["that is a stupid question.", "obviously, stop wasting my time.",
        "figure it out yourself, idiot.", "what a silly thing to ask."]


class ToneParams(RewardParams):
    friendly: list[str] = Field(default_factory=lambda: list(FRIENDLY), description="anchors of the wanted tone")
    rude: list[str] = Field(default_factory=lambda: list(RUDE), description="anchors of the unwanted tone")
    scale: PositiveFloat = Field(5.0, description="multiplies the similarity gap (cosines differ by ~0.1)")


@register("tone", ToneParams)
def tone_reward(p: ToneParams) -> RewardFn:
    """sigmoid(scale x (max cosine to a friendly anchor - max cosine to a rude anchor)), in (0, 1)."""
    anchors: dict[str, torch.Tensor] = {}

    def score(prompts, completions, references) -> list[float]:
        if not anchors:
            anchors["friendly"], anchors["rude"] = sentence_embeddings(p.friendly), sentence_embeddings(p.rude)
        emb = sentence_embeddings(completions)
        gap = (emb @ anchors["friendly"].T).amax(-1) - (emb @ anchors["rude"].T).amax(-1)
        return torch.sigmoid(p.scale * gap).tolist()

    return score


# --------------------------------------------------------------------------- neural reward models


class RewardModelParams(RewardParams):
    path: str = Field(..., description="Hugging Face id or local folder of a sequence-classification reward model")
    label: int = Field(0, ge=0, description="which output logit is the reward")
    max_length: PositiveInt = 256


@register("reward_model", RewardModelParams)
def reward_model_reward(p: RewardModelParams) -> RewardFn:
    """The chosen logit of a sequence-classification reward model on "prompt completion"."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(p.path).eval()
        tokenizer = AutoTokenizer.from_pretrained(p.path)
    except OSError as exc:
        raise ValueError(f"reward_model: cannot load {p.path!r} ({exc}); give a local folder with config.json, "
                         "weights and tokenizer, or a Hugging Face id with the hub reachable") from None
    if p.label >= model.config.num_labels:
        raise ValueError(f"reward_model: label {p.label} out of range for {model.config.num_labels} outputs")

    @torch.no_grad()
    def score(prompts, completions, references) -> list[float]:
        enc = tokenizer(list(prompts), list(completions), padding=True, truncation=True,
                        max_length=p.max_length, return_tensors="pt")
        return model(**enc).logits[:, p.label].float().tolist()

    return score


# --------------------------------------------------------------------------- mixing


def normalise_batch(scores: Sequence[float]) -> list[float]:
    """z-score over the batch; all-equal scores carry no signal and become zeros."""
    t = torch.tensor(scores, dtype=torch.float64)
    std = t.std(unbiased=False)
    if len(t) < 2 or std < 1e-8:
        return [0.0] * len(t)
    return ((t - t.mean()) / std).tolist()


def mix(scores: Mapping[str, Sequence[float]], weights: Mapping[str, float], normalise: bool) -> list[float]:
    """The weighted sum of the named rewards (each z-scored over the batch first when ``normalise``)."""
    missing = [name for name in weights if name not in scores]
    if missing:
        raise KeyError(f"preference weights name rewards {missing} that were not computed ({sorted(scores)})")
    n = len(next(iter(scores.values())))
    total = [0.0] * n
    for name, w in weights.items():
        vals = normalise_batch(scores[name]) if normalise else list(scores[name])
        total = [t + w * v for t, v in zip(total, vals)]
    return total


def score_all(rewards: Mapping[str, RewardFn], prompts: Sequence[str], completions: Sequence[str],
              references: Sequence[str]) -> dict[str, list[float]]:
    return {name: [float(v) for v in fn(prompts, completions, references)] for name, fn in rewards.items()}
