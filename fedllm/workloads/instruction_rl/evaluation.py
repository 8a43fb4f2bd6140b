"""PFIT's data and evaluation: whose prompts, whose preference, how well a policy serves each one.

Clients split the training prompts (seeded, disjoint, near-equal shares) and each holds one
preference: a weighting of the named rewards, ``rl.preferences[p % len]`` for partition p, or a
seeded Dirichlet(``rl.preference_alpha``) draw over all rewards. A policy is evaluated by
greedy completions of the held-out prompts, scored with every reward (raw, not
batch-normalised, so numbers compare across policies and rounds) and mixed under every
preference: the row of the preference matrix for that policy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from fedllm.clients.rewards import build_rewards, mix, score_all
from fedllm.config import ExperimentConfig, RLSection
from fedllm.core.bundle import ModelBundle
from fedllm.core.errors import DataError
from fedllm.workloads.instruction_rl.instructions import Instruction
from fedllm.workloads.instruction_rl.policy import generate, kl_to_reference, prompts_for, render_prompts


def client_prompts(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> list[Instruction]:
    items = prompts_for(cfg, "train")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    if len(items) < num_partitions:
        raise DataError(f"rl.prompts: {len(items)} training prompts cannot fill {num_partitions} clients; use fewer "
                        "clients or more prompts")
    order = list(range(len(items)))
    random.Random(f"prompts-{cfg.seed}").shuffle(order)
    return [items[i] for i in order[partition_id::num_partitions]]


def client_preference(rl: RLSection, partition_id: int, seed: int) -> dict[str, float]:
    """This client's weights over the rewards (normalised to sum to 1)."""
    if rl.preference_alpha is not None:
        names = sorted(rl.rewards)
        draw = np.random.default_rng([seed, partition_id]).dirichlet([rl.preference_alpha] * len(names))
        weights = dict(zip(names, draw.tolist()))
    else:
        weights = dict(rl.preferences[partition_id % len(rl.preferences)])
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def preferences_of(cfg: ExperimentConfig, num_clients: int) -> list[dict[str, float]]:
    assert cfg.rl is not None
    return [client_preference(cfg.rl, p, cfg.seed) for p in range(num_clients)]


@dataclass
class PolicyScores:
    per_reward: dict[str, float]  # mean raw score of each reward
    per_preference: list[float]  # mean mixed reward under each preference
    kl: float
    samples: list[dict[str, str]]


def evaluate_policy(bundle: ModelBundle, cfg: ExperimentConfig, preferences: list[dict[str, float]],
                    samples: int = 4, with_kl: bool = True) -> PolicyScores:
    """Greedy completions of the test prompts scored by every reward and mixed under every preference;
    ``with_kl``: also the KL to the reference on sampled completions (a second generation pass)."""
    rl = cfg.rl
    assert rl is not None
    test = render_prompts(prompts_for(cfg, "test"), bundle.tokenizer)
    prompts, refs = [t.prompt for t in test], [t.reference for t in test]
    completions = generate(bundle, prompts, rl.max_new_tokens)
    scores = score_all(build_rewards(rl.rewards), prompts, completions, refs)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    kl = float("nan")
    if with_kl:
        sampled = generate(bundle, prompts, rl.max_new_tokens, sample=True, temperature=rl.temperature, seed=cfg.seed)
        kl = kl_to_reference(bundle, prompts, sampled)
    return PolicyScores(
        per_reward={k: mean(v) for k, v in scores.items()},
        per_preference=[mean(mix(scores, pref, normalise=False)) for pref in preferences],
        kl=kl,
        samples=[{"prompt": p, "completion": c, "reference": r} for p, c, r in
                 zip(prompts[:samples], completions[:samples], refs[:samples])],
    )
