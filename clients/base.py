"""The trainer interface shared by the supervised PEFT and the RL trainers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fedllm.core.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedllm.core.bundle import ModelBundle


class LocalTraining(Protocol):
    """What every trainer reads of the experiment's ``client:`` section."""

    lr: float
    optimizer: str
    weight_decay: float
    local_epochs: int
    batch_size: int
    max_steps: int | None
    prox_mu: float


class RLSettings(Protocol):
    """What the RL trainer reads of the experiment's ``rl:`` section."""

    rewards: Mapping[str, Mapping[str, Any]]
    num_generations: int
    max_new_tokens: int
    temperature: float
    beta: float


@dataclass
class TrainContext:
    section: LocalTraining
    label_ranges: list[tuple[int, int]]
    max_length: int
    seed: int
    # The global group as received, for a proximal term mu/2 ||w - anchor||^2 (FedProx, PFTT's
    # personalised loss); None when client.prox_mu is 0.
    anchor: "dict[str, torch.Tensor] | None" = None
    # RL instruction tuning: this client's weights over the named rewards of cfg.rl.
    preference: "dict[str, float] | None" = None
    rl: RLSettings | None = None
    # What the server sent besides the global group (e.g. SCAFFOLD's control variate), and what this
    # client kept from its earlier rounds (its own control variate); both by name, then tensor name.
    incoming: "dict[str, dict[str, torch.Tensor]]" = field(default_factory=dict)
    kept: "dict[str, dict[str, torch.Tensor]]" = field(default_factory=dict)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's training in one round: distinct per client and round, the same
    wherever that training is replayed (the ClientApp, the plain-loop benchmark)."""
    return (seed * 100_003 + server_round * 1_009 + partition_id) % (2**31 - 1)  # numpy's and TRL's seed range


def proximal_term(model: "torch.nn.Module", anchor: "dict[str, torch.Tensor]", mu: float) -> "torch.Tensor":
    """mu/2 * sum ||w - anchor||^2 over the anchored tensors (zero when they are equal)."""
    import torch

    params = dict(model.named_parameters())
    total = torch.zeros((), device=next(iter(params.values())).device)
    for name, ref in anchor.items():
        total = total + (params[name] - ref.to(params[name].device)).pow(2).sum()
    return 0.5 * mu * total


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps taken
    steps: int
    examples_seen: int
    extra: dict[str, float] = field(default_factory=dict)  # trainer-specific metrics for the reply
    statistics: "dict[str, dict[str, torch.Tensor]]" = field(default_factory=dict)  # sent with the update
    keep: "dict[str, dict[str, torch.Tensor]]" = field(default_factory=dict)  # kept by the client for next rounds


class Trainer(Protocol):
    def __call__(self, bundle: "ModelBundle", examples: Any, ctx: TrainContext) -> TrainResult: ...


TRAINERS: Registry[Trainer] = Registry("client trainer")
