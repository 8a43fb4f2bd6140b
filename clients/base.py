"""The trainer interface shared by supervised PEFT and (later) RL trainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

from fedllm.registry import Registry

if TYPE_CHECKING:
    from fedllm.config import ClientSection
    from fedllm.data import Examples
    from fedllm.models import ModelBundle


@dataclass
class TrainContext:
    section: "ClientSection"
    label_ranges: list[tuple[int, int]]
    max_length: int
    seed: int
    # The global group as received, for a proximal term mu/2 ||w - anchor||^2 (FedProx, PFTT's
    # personalised loss); None when client.prox_mu is 0.
    anchor: "dict[str, torch.Tensor] | None" = None


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


class Trainer(Protocol):
    def __call__(self, bundle: "ModelBundle", examples: "Examples", ctx: TrainContext) -> TrainResult: ...


TRAINERS: Registry[Trainer] = Registry("client trainer")
