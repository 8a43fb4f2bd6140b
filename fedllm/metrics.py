"""Evaluation metrics: accuracy per task on held-out data."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedllm.data import Examples, TaskSuite
from fedllm.models import ModelBundle, forward_logits


@torch.no_grad()
def evaluate_tasks(bundle: ModelBundle, model: torch.nn.Module, suite: TaskSuite, examples: Examples,
                   batch_size: int, max_length: int) -> dict[str, float]:
    """Accuracy per task (``accuracy/<task>``), their mean (``accuracy``) and the mean loss."""
    model.eval()
    correct = [0] * len(suite.tasks)
    total = [0] * len(suite.tasks)
    loss_sum = 0.0
    for start in range(0, len(examples), batch_size):
        texts = examples.texts[start:start + batch_size]
        tasks = examples.tasks[start:start + batch_size]
        labels = torch.tensor(examples.labels[start:start + batch_size], device=bundle.device)
        logits = forward_logits(bundle, model, texts, tasks, suite.label_ranges, max_length)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        hits = (logits.argmax(dim=-1) == labels).tolist()
        for t, hit in zip(tasks, hits):
            correct[t] += int(hit)
            total[t] += 1
    out = {f"accuracy/{task.name}": correct[k] / total[k] for k, task in enumerate(suite.tasks) if total[k]}
    per_task = [v for v in out.values()]
    out["accuracy"] = sum(per_task) / len(per_task) if per_task else float("nan")
    out["eval_loss"] = loss_sum / max(1, len(examples))
    return out
