"""Instruction tuning of a causal LM by RL against each client's own mix of rewards (PFIT).

Clients split the training prompts and each holds a preference over the named rewards; they
run GRPO (``fedllm.clients.rl``). The global policy is scored under every client's preference,
each client's personalised policy under every preference too: the preference matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedllm.clients import TrainContext
from fedllm.core.bundle import ModelBundle
from fedllm.core.errors import DataError
from fedllm.core.types import Instruction
from fedllm.core.vectors import Tensors, set_tensors
from fedllm.workloads.base import WORKLOADS, ClientEvaluation, Evaluation, Workload
from fedllm.workloads.instruction_rl.evaluation import (
    PolicyScores,
    client_preference,
    client_prompts,
    evaluate_policy,
    preferences_of,
)
from fedllm.workloads.instruction_rl.policy import build_policy, cached_policy, render_prompts


def _policy_metrics(scores: PolicyScores) -> dict[str, float]:
    return {"kl": scores.kl, **{f"reward/p{j}": r for j, r in enumerate(scores.per_preference)},
            **{f"score/{k}": v for k, v in scores.per_reward.items()}}


@WORKLOADS.register("instruction_rl")
class InstructionRL(Workload):
    name = "instruction_rl"
    metric = "reward"

    def check_data(self, num_partitions: int) -> None:
        client_prompts(self.cfg, 0, num_partitions)  # loads rl.prompts; too few for the clients is an error

    def describe(self) -> str:
        rl = self.cfg.rl
        assert rl is not None
        return f"RL on {rl.prompts} prompts, rewards {sorted(rl.rewards)}"

    def build_model(self) -> ModelBundle:
        return build_policy(self.cfg)

    def cached_model(self) -> ModelBundle:
        return cached_policy(self.cfg)

    # ---------------------------------------------------------------- client side
    def client_data(self, partition_id: int, num_partitions: int, node_config: Mapping[str, Any]) -> list[Instruction]:
        if partition_id < 0:
            raise DataError("RL instruction tuning reads its prompts from rl.prompts; start the SuperNode with "
                            "--node-config 'partition-id=P num-partitions=N'")
        return render_prompts(client_prompts(self.cfg, partition_id, num_partitions), self.cached_model().tokenizer)

    def train_context(self, data: list[Instruction], partition_id: int, seed: int,
                      anchor: Tensors | None) -> TrainContext:
        rl = self.cfg.rl
        assert rl is not None
        return TrainContext(self.cfg.client, [], self.cfg.model.max_length, seed=seed, anchor=anchor,
                            preference=client_preference(rl, partition_id, self.cfg.seed), rl=rl)

    def evaluate_client(self, bundle: ModelBundle, data: list[Instruction], partition_id: int, num_partitions: int,
                        node_config: Mapping[str, Any]) -> ClientEvaluation:
        """This client's policy under every client's preference: its row of the preference matrix (no KL:
        the round's record keeps the global policy's, and it would cost a second generation pass)."""
        scores = evaluate_policy(bundle, self.cfg, preferences_of(self.cfg, num_partitions), samples=0, with_kl=False)
        metrics = {k: v for k, v in _policy_metrics(scores).items() if k != "kl"}
        return ClientEvaluation({"reward": scores.per_preference[partition_id], **metrics}, len(data))

    # ---------------------------------------------------------------- server side
    def evaluate(self, bundle: ModelBundle, params: Tensors, num_clients: int) -> Evaluation:
        """The global policy (its local part at the initial value) under every client's preference."""
        set_tensors(bundle.model, params)
        set_tensors(bundle.model, bundle.initial_local)
        prefs = preferences_of(self.cfg, num_clients)
        scores = evaluate_policy(bundle, self.cfg, prefs)
        return Evaluation({"reward": sum(scores.per_preference) / len(prefs), **_policy_metrics(scores)},
                          scores.samples)

    def summarize_clients(self, per_client: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
        """Besides mean and worst: the preference matrix, each client's policy under every preference."""
        out = super().summarize_clients(per_client)
        rows = {name: [float(m[k]) for k in sorted((k for k in m if k.startswith("reward/p")),
                                                     key=lambda k: int(k.removeprefix("reward/p")))]
                for name, m in per_client.items()}
        if any(rows.values()):
            out["preference_matrix"] = dict(sorted(rows.items(), key=lambda kv: int(kv[0][1:])))
        return out
