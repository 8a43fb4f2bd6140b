"""The Workload interface: what is trained and how it is scored.

A workload turns an experiment config into models, client data, a trainer's context and
scores. The ServerApp and the ClientApp only call this interface, so a new kind of job (say,
causal-LM fine-tuning) is a new class registered in :data:`WORKLOADS`, and no app grows a branch.

Server side: build the model, check the data before anything starts, evaluate the global model,
summarise the clients' personalised evaluations. Client side: load this client's data, the
context its trainer (``fedllm.clients``) runs in, and its personalised evaluation. Workloads that
hold labelled data on the server also serve the fusion pipeline: a validation score for the
scale search, few-shot examples and a loss for a rule's post-merge training (R-MTLLMF), and the
multi-task fusion metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedllm.clients import TrainContext
from fedllm.config import ExperimentConfig
from fedllm.core.bundle import ModelBundle
from fedllm.core.errors import ConfigError
from fedllm.core.registry import Registry
from fedllm.core.vectors import Tensors


@dataclass
class Evaluation:
    """Scores of one model, plus sample generations to keep (``samples.jsonl``) where there are any."""

    metrics: dict[str, Any]
    samples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class ClientEvaluation:
    metrics: dict[str, float]
    num_examples: int


class Workload(ABC):
    """One kind of federated job; ``metric`` is the score that names a run (higher is better)."""

    name: ClassVar[str]
    metric: ClassVar[str]

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    # ---------------------------------------------------------------- both sides
    @abstractmethod
    def check_data(self, num_partitions: int) -> None:
        """Raise ``DataError`` before training when the data cannot serve ``num_partitions`` clients."""

    @abstractmethod
    def describe(self) -> str:
        """What the run trains on, for its first log line."""

    @abstractmethod
    def build_model(self) -> ModelBundle:
        """A fresh model bundle (the server's)."""

    @abstractmethod
    def cached_model(self) -> ModelBundle:
        """The model bundle of this process, reused across rounds and virtual clients: every trainable
        tensor is overwritten from the message or the client's state before use."""

    # ---------------------------------------------------------------- client side
    @abstractmethod
    def client_data(self, partition_id: int, num_partitions: int, node_config: Mapping[str, Any]) -> Sized:
        """This client's training data: its partition, or a device's own data (``partition_id`` -1)."""

    @abstractmethod
    def train_context(self, data: Sized, partition_id: int, seed: int,
                      anchor: Tensors | None) -> TrainContext:
        """What the trainer needs besides the model and the data."""

    def client_statistics(self, bundle: ModelBundle, data: Sized, requested: Mapping[str, Mapping[str, Any]],
                          sent: Sequence[str]) -> dict[str, Tensors]:
        """Statistics of the client's own data that a fusion rule fuses with (``requested``: name ->
        settings, e.g. ``fisher`` or ``gram``), over the tensors of ``sent``."""
        raise ConfigError(f"the {self.name!r} workload computes no client statistics "
                          f"({', '.join(requested)}); choose another strategy")

    def data_metrics(self, data: Sized) -> dict[str, float]:
        """Facts about a client's data the server records (e.g. which task it holds)."""
        return {}

    @abstractmethod
    def evaluate_client(self, bundle: ModelBundle, data: Sized, partition_id: int, num_partitions: int,
                        node_config: Mapping[str, Any]) -> ClientEvaluation:
        """The client's personalised model (already loaded in ``bundle``) on its own test data."""

    # ---------------------------------------------------------------- server side
    @abstractmethod
    def evaluate(self, bundle: ModelBundle, params: Tensors, num_clients: int) -> Evaluation:
        """The global model ``params`` on the run's held-out data."""

    def summarize_clients(self, per_client: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
        """The round's record of the clients' personalised evaluations: mean, worst, each client."""
        if not per_client:
            return {}
        m = self.metric
        values = {name: float(metrics[m]) for name, metrics in per_client.items()}
        return {f"personalized_{m}": sum(values.values()) / len(values), f"worst_client_{m}": min(values.values()),
                f"client_{m}": dict(sorted(values.items()))}

    # ---------------------------------------------------------------- labelled data held by the server
    def _no_labels(self, what: str) -> ConfigError:
        return ConfigError(f"{what} needs labelled data on the server, which the {self.name!r} workload has not")

    def has_validation(self) -> bool:
        return False

    def validation_score(self, bundle: ModelBundle, params: Tensors) -> float:
        raise self._no_labels("strategy.server_lr 'auto'")

    def few_shot(self, shots: int, seed: int) -> Any:
        raise self._no_labels("few-shot realignment")

    def few_shot_loss(self, bundle: ModelBundle, examples: Any, model: torch.nn.Module | None = None) -> torch.Tensor:
        raise self._no_labels("few-shot realignment")

    def prediction_entropy(self, bundle: ModelBundle, examples: Any,
                           model: torch.nn.Module | None = None) -> torch.Tensor:
        raise self._no_labels("learning merging coefficients")

    def fusion_metrics(self, bundle: ModelBundle, merged: Tensors, individual: Mapping[int, Tensors]) -> dict[str, float]:
        raise self._no_labels("eval.fusion_metrics")


WORKLOADS: Registry[type[Workload]] = Registry("workload")
