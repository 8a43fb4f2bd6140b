"""Evaluation metrics: accuracy per task, and multi-task fusion metrics.

Fusion metrics compare the merged model with each task's individually fine-tuned model
(θ0 + τ_t from the client's clean, pre-channel task vector): normalised accuracy
(merged / individual accuracy on task t) and the weight-disentanglement error of
Ortiz-Jiménez et al. (NeurIPS 2023), here the rate at which the merged model's prediction
differs from task t's own model on task t's inputs (0 for identical predictions, 1 when
they always disagree).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fedllm.core.bundle import CHARS_PER_TOKEN_BOUND, ModelBundle, forward_logits
from fedllm.core.types import Examples
from fedllm.core.vectors import set_tensors
from fedllm.workloads.classification.data import TaskSuite


@torch.no_grad()
def predict(bundle: ModelBundle, model: torch.nn.Module, suite: TaskSuite, examples: Examples,
            batch_size: int, max_length: int) -> tuple[torch.Tensor, float]:
    """Predicted joint labels of ``examples`` (in their order) and the summed cross-entropy loss.
    Batches are formed by token count, so each pads to about its own length instead of every row to
    the longest of a mixed batch (padding changes no prediction: the attention mask hides it). On the
    8 shared tasks' test sets with SmolLM2's tokenizer that is 2.00x fewer token positions (55k vs
    110k); sorting by characters gives only 1.33x (benchmarks/eval_batches.py)."""
    model.eval()
    preds = torch.zeros(len(examples), dtype=torch.long)
    loss_sum = 0.0
    lengths = token_counts(bundle.tokenizer, examples.texts, max_length)
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        logits = forward_logits(bundle, model, [examples.texts[i] for i in rows], [examples.tasks[i] for i in rows],
                                suite.label_ranges, max_length)
        labels = torch.tensor([examples.labels[i] for i in rows], device=logits.device)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        preds[rows] = logits.argmax(dim=-1).cpu()
    return preds, loss_sum


def token_counts(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """Tokens of each text after truncation (0.1-0.3 s for 2,400 short texts with a fast tokenizer; their
    forward passes through a 135M model take minutes)."""
    cut = [t[: max_length * CHARS_PER_TOKEN_BOUND] for t in texts]
    return [len(ids) for ids in tokenizer(cut, truncation=True, max_length=max_length)["input_ids"]]


def per_task_accuracy(preds: torch.Tensor, examples: Examples, suite: TaskSuite) -> dict[str, float]:
    labels = torch.tensor(examples.labels)
    tasks = torch.tensor(examples.tasks)
    out = {}
    for k, task in enumerate(suite.tasks):
        rows = tasks == k
        if rows.any():
            out[task.name] = float((preds[rows] == labels[rows]).float().mean())
    return out


def evaluate_tasks(bundle: ModelBundle, model: torch.nn.Module, suite: TaskSuite, examples: Examples,
                   batch_size: int, max_length: int) -> dict[str, float]:
    """Accuracy per task (``accuracy/<task>``), their mean (``accuracy``) and the mean loss."""
    preds, loss_sum = predict(bundle, model, suite, examples, batch_size, max_length)
    return task_scores(preds, loss_sum, examples, suite)


def task_scores(preds: torch.Tensor, loss_sum: float, examples: Examples, suite: TaskSuite) -> dict[str, float]:
    """:func:`evaluate_tasks` from predictions already made (a caller that also needs them for
    fusion metrics predicts once)."""
    per_task = per_task_accuracy(preds, examples, suite)
    out = {f"accuracy/{name}": acc for name, acc in per_task.items()}
    out["accuracy"] = sum(per_task.values()) / len(per_task) if per_task else float("nan")
    out["eval_loss"] = loss_sum / max(1, len(examples))
    return out


def disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of inputs on which two models' predictions differ (the WD error's distance)."""
    if a.shape != b.shape:
        raise ValueError(f"prediction vectors differ in length: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a != b).float().mean()) if len(a) else 0.0


def individual_predictions(bundle: ModelBundle, suite: TaskSuite, test: Examples,
                           individual: Mapping[int, Mapping[str, torch.Tensor]], batch_size: int,
                           max_length: int) -> dict[int, torch.Tensor]:
    """Each task's own model's predictions on that task's test inputs (fixed across merges, so a
    benchmark that scores many merges of the same task vectors computes them once)."""
    tasks = torch.tensor(test.tasks)
    out = {}
    for t, params in sorted(individual.items()):
        rows = torch.nonzero(tasks == t).flatten().tolist()
        if rows:
            set_tensors(bundle.model, params)
            out[t], _ = predict(bundle, bundle.model, suite, test.subset(rows), batch_size, max_length)
    return out


def fusion_scores(merged_preds: torch.Tensor, own_preds: Mapping[int, torch.Tensor], test: Examples,
                  suite: TaskSuite) -> dict[str, float]:
    """Normalised accuracy and WD error of the merged model's predictions against each task's own."""
    tasks = torch.tensor(test.tasks)
    labels = torch.tensor(test.labels)
    out: dict[str, float] = {}
    norm_accs, wds = [], []
    for t, own in sorted(own_preds.items()):
        rows = torch.nonzero(tasks == t).flatten()
        name = suite.tasks[t].name
        own_acc = float((own == labels[rows]).float().mean())
        merged_acc = float((merged_preds[rows] == labels[rows]).float().mean())
        out[f"individual_accuracy/{name}"] = own_acc
        out[f"normalized_accuracy/{name}"] = merged_acc / own_acc if own_acc > 0 else float("nan")
        out[f"wd_error/{name}"] = disagreement(merged_preds[rows], own)
        norm_accs.append(out[f"normalized_accuracy/{name}"])
        wds.append(out[f"wd_error/{name}"])
    if norm_accs:
        out["normalized_accuracy"] = sum(norm_accs) / len(norm_accs)
        out["wd_error"] = sum(wds) / len(wds)
    return out


def fusion_metrics(bundle: ModelBundle, suite: TaskSuite, test: Examples, merged: Mapping[str, torch.Tensor],
                   individual: Mapping[int, Mapping[str, torch.Tensor]], batch_size: int,
                   max_length: int) -> dict[str, float]:
    """Normalised accuracy and WD error of ``merged`` against each task's individual parameters."""
    own = individual_predictions(bundle, suite, test, individual, batch_size, max_length)
    set_tensors(bundle.model, merged)
    merged_preds, _ = predict(bundle, bundle.model, suite, test, batch_size, max_length)
    return fusion_scores(merged_preds, own, test, suite)
