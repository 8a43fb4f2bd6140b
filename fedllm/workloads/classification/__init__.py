"""Classification of texts by a fine-tuned encoder (or any model with a classification head).

One or more labelled tasks share a joint label space; clients hold partitions of the training
split (IID, Dirichlet label skew, one task each) or, on a real device, their own file. The server
keeps each task's test split for the global model and a validation split for its own choices
(the scale search of task arithmetic, R-MTLLMF's few-shot realignment, fusion metrics).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from fedllm.clients import TrainContext
from fedllm.core.bundle import CHARS_PER_TOKEN_BOUND, ModelBundle, forward_logits
from fedllm.core.errors import ConfigError
from fedllm.core.modules import sent_linear_layers
from fedllm.core.types import Examples
from fedllm.core.vectors import Tensors, set_tensors
from fedllm.workloads.base import WORKLOADS, ClientEvaluation, Evaluation, Workload
from fedllm.workloads.classification.data import (
    TaskSuite,
    check_partitions,
    client_examples,
    load_suite,
    local_examples,
)
from fedllm.workloads.classification.metrics import evaluate_tasks, fusion_metrics
from fedllm.workloads.classification.models import build_bundle, cached_bundle


def few_shot_set(pool: Examples, num_tasks: int, shots: int, seed: int) -> Examples:
    """``shots`` examples of each task from ``pool`` (the validation split), chosen by seed."""
    rng = random.Random(f"realign-{seed}")
    chosen: list[int] = []
    for t in range(num_tasks):
        idx = [i for i, task in enumerate(pool.tasks) if task == t]
        chosen += rng.sample(idx, min(shots, len(idx)))
    return pool.subset(sorted(chosen))


def _first(data: Examples, n: int) -> Examples:
    return data.subset(list(range(min(n, len(data)))))


def empirical_fisher(bundle: ModelBundle, data: Examples, suite: TaskSuite, max_length: int, sent: Sequence[str],
                     examples: int) -> Tensors:
    params = dict(bundle.model.named_parameters())
    total = {n: torch.zeros_like(params[n], device="cpu") for n in sent}
    chosen = _first(data, examples)
    bundle.model.eval()
    for i in range(len(chosen)):
        one = chosen.subset([i])
        logits = forward_logits(bundle, bundle.model, one.texts, one.tasks, suite.label_ranges, max_length)
        loss = F.cross_entropy(logits, torch.tensor(one.labels, device=logits.device))
        grads = torch.autograd.grad(loss, [params[n] for n in sent], allow_unused=True)
        for n, g in zip(sent, grads):
            if g is not None:
                total[n] += g.detach().cpu().pow(2)
    return {n: t / max(1, len(chosen)) for n, t in total.items()}


@torch.no_grad()
def input_grams(bundle: ModelBundle, data: Examples, suite: TaskSuite, max_length: int, sent: Sequence[str],
                examples: int, batch_size: int) -> Tensors:
    """Padding positions are left out, so the result does not depend on how examples are batched."""
    layers = sent_linear_layers(bundle.model, sent)
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in layers.items()}
    real_tokens: list[torch.Tensor] = []  # the current batch's attention mask

    def accumulate(name: str):
        def hook(module, args, output) -> None:  # returns None: the layer's output is left as it is
            x = args[0].detach()
            mask = real_tokens[-1]
            x = x[mask.to(x.device)] if x.dim() == 3 and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            x = x.double().cpu()
            grams[name].add_(x.T @ x)
        return hook

    hooks = [module.register_forward_hook(accumulate(name)) for name, module in layers.items()]
    chosen = _first(data, examples)
    bundle.model.eval()
    try:
        for start in range(0, len(chosen), batch_size):
            part = chosen.subset(list(range(start, min(start + batch_size, len(chosen)))))
            texts = [t[: max_length * CHARS_PER_TOKEN_BOUND] for t in part.texts]
            real_tokens.append(bundle.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                                return_tensors="pt")["attention_mask"].bool())
            forward_logits(bundle, bundle.model, part.texts, part.tasks, suite.label_ranges, max_length)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (g / max(1, len(chosen))).float() for name, g in grams.items()}


@WORKLOADS.register("classification")
class Classification(Workload):
    name = "classification"
    metric = "accuracy"

    @cached_property
    def suite(self) -> TaskSuite:
        return load_suite(self.cfg.data, self.cfg.seed)

    @cached_property
    def test(self) -> Examples:
        return self.suite.split("test")

    @cached_property
    def validation(self) -> Examples:
        return self.suite.split("validation")

    def check_data(self, num_partitions: int) -> None:
        check_partitions(self.cfg.data, num_partitions, self.cfg.seed)

    def describe(self) -> str:
        return f"tasks {[t.name for t in self.suite.tasks]}"

    def build_model(self) -> ModelBundle:
        return build_bundle(self.cfg, self.suite.label_names)

    def cached_model(self) -> ModelBundle:
        return cached_bundle(self.cfg, self.suite.label_names)

    def _scores(self, bundle: ModelBundle, examples: Examples) -> dict[str, float]:
        return evaluate_tasks(bundle, bundle.model, self.suite, examples, self.cfg.eval.batch_size,
                              self.cfg.model.max_length)

    # ---------------------------------------------------------------- client side
    def client_data(self, partition_id: int, num_partitions: int, node_config: Mapping[str, Any]) -> Examples:
        if partition_id < 0:  # a real device with its own data
            task = node_config.get("task")
            return local_examples(self.suite, str(node_config["data-path"]), str(task) if task else None)
        return client_examples(self.cfg.data, partition_id, num_partitions, self.cfg.seed)

    def train_context(self, data: Examples, partition_id: int, seed: int, anchor: Tensors | None) -> TrainContext:
        return TrainContext(self.cfg.client, self.suite.label_ranges, self.cfg.model.max_length, seed=seed,
                            anchor=anchor)

    def client_statistics(self, bundle: ModelBundle, data: Examples, requested: Mapping[str, Mapping[str, Any]],
                          sent: Sequence[str]) -> dict[str, Tensors]:
        """``fisher``: the diagonal empirical Fisher of the sent tensors, mean over examples of the squared
        gradient of log p(y | x); ``gram``: X^T X of the inputs of every sent linear layer, over all
        tokens, divided by the number of examples (as FusionBench's RegMean)."""
        computes = {
            "fisher": lambda settings: empirical_fisher(bundle, data, self.suite, self.cfg.model.max_length, sent,
                                                        int(settings["examples"])),
            "gram": lambda settings: input_grams(bundle, data, self.suite, self.cfg.model.max_length, sent,
                                                 int(settings["examples"]), self.cfg.eval.batch_size)}
        unknown = sorted(set(requested) - set(computes))
        if unknown:
            raise ConfigError(f"the classification workload cannot compute the client statistics {unknown}")
        return {name: computes[name](settings) for name, settings in requested.items()}

    def data_metrics(self, data: Examples) -> dict[str, float]:
        own_tasks = set(data.tasks)
        return {"task": own_tasks.pop() if len(own_tasks) == 1 else -1}

    def evaluate_client(self, bundle: ModelBundle, data: Examples, partition_id: int, num_partitions: int,
                        node_config: Mapping[str, Any]) -> ClientEvaluation:
        """Its own test partition; a device with its own data: the run's test split of its tasks."""
        if partition_id >= 0:
            test = client_examples(self.cfg.data, partition_id, num_partitions, self.cfg.seed, split="test")
        else:
            mine = set(data.tasks)
            test = self.test.subset([i for i, t in enumerate(self.test.tasks) if t in mine])
        scores = self._scores(bundle, test)
        return ClientEvaluation({"accuracy": scores["accuracy"], "eval_loss": scores["eval_loss"]}, len(test))

    # ---------------------------------------------------------------- server side
    def evaluate(self, bundle: ModelBundle, params: Tensors, num_clients: int) -> Evaluation:
        set_tensors(bundle.model, params)
        return Evaluation(self._scores(bundle, self.test))

    def has_validation(self) -> bool:
        return len(self.validation) > 0

    def validation_score(self, bundle: ModelBundle, params: Tensors) -> float:
        set_tensors(bundle.model, params)
        return self._scores(bundle, self.validation)["accuracy"]

    def few_shot(self, shots: int, seed: int) -> Examples:
        return few_shot_set(self.validation, len(self.suite.tasks), shots, seed)

    def _logits(self, bundle: ModelBundle, examples: Examples, model: torch.nn.Module | None) -> torch.Tensor:
        return forward_logits(bundle, model or bundle.model, examples.texts, examples.tasks, self.suite.label_ranges,
                              self.cfg.model.max_length)

    def few_shot_loss(self, bundle: ModelBundle, examples: Examples, model: torch.nn.Module | None = None) -> torch.Tensor:
        logits = self._logits(bundle, examples, model)
        return F.cross_entropy(logits, torch.tensor(examples.labels, device=logits.device))

    def prediction_entropy(self, bundle: ModelBundle, examples: Examples,
                           model: torch.nn.Module | None = None) -> torch.Tensor:
        """Over each example's own task's labels (the others are masked out of the logits)."""
        logp = torch.log_softmax(self._logits(bundle, examples, model), dim=-1)
        return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1).mean()

    def fusion_metrics(self, bundle: ModelBundle, merged: Tensors, individual: Mapping[int, Tensors]) -> dict[str, float]:
        return fusion_metrics(bundle, self.suite, self.test, merged, individual, self.cfg.eval.batch_size,
                              self.cfg.model.max_length)
